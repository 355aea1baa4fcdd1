"""VQGAN decoding (enat.vq, the paper's tokenizer, docs/VQ.md): token ids -> images, images/s and TFLOP/s.

On a GPU: a batch of 128 at 256 px and of 32 at 512 px, the module converted to bf16 and to fp16
(`vqgan.to("cuda", dtype)`: channels_last cuDNN convolutions, the module's layout), against the same
weights in NCHW (contiguous) layout ("nchw", the baseline), and (extended) channels_last under
torch.compile ("compiled"). On a CPU: one 256 px image in fp32 with the
paper's tokenizer; a CPU smoke run (--benchmark-disable) decodes with the narrow enat.vq.TINY_CONFIG only.
The FLOPs are 2 x enat.vq.decoder_macs (what torch.utils.flop_counter counts).
"""

import pytest
import torch
import torch.nn.functional as F

from enat import vq
from harness import DEVICE, ON_GPU, extended, measure

if ON_GPU:
    CASES = [(256, 128), (512, 32)]
    DTYPES = [torch.bfloat16, torch.float16]
    PROVIDERS = ["channels_last", "nchw", pytest.param("compiled", marks=extended)]
    ROUNDS = 5
else:
    CASES = [(256, 1)]
    DTYPES = [torch.float32]
    PROVIDERS = ["channels_last"]
    ROUNDS = 2
BASELINE = "nchw"

_models = {}


def _model(config_name, dtype, provider):
    key = (config_name, dtype, provider)
    if key not in _models:
        _models.clear()
        torch.manual_seed(0)
        model = vq.VQGAN(**vq.CONFIGS[config_name]).eval().to(DEVICE, dtype)
        if provider == "nchw":
            model = model.to(memory_format=torch.contiguous_format)
        _models[key] = model
    return _models[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("resolution", "batch"), CASES, ids=lambda v: str(v))
def bench_vq_decode(benchmark, resolution, batch, dtype, provider):
    config_name = "tiny" if (benchmark.disabled and not ON_GPU) else "paper"
    model = _model(config_name, dtype, provider)
    L = (resolution // model.downsample) ** 2
    ids = torch.randint(0, model.n_embed, (batch, L), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))

    if provider == "compiled":  # the same module under torch.compile (fuses GroupNorm and swish)
        compiled = torch.compile(model.decode, dynamic=False)

        def decode():
            with torch.no_grad():
                return compiled(ids)
    elif provider == "nchw":
        side = resolution // model.downsample

        def decode():
            with torch.no_grad():
                z = F.embedding(ids, model.quantize.embedding.weight).view(batch, side, side, -1)
                return model.decoder(z.permute(0, 3, 1, 2).contiguous()).clamp_(0, 1)
    else:
        def decode():
            with torch.no_grad():
                return model.decode(ids)

    macs = vq.decoder_macs(resolution, **vq.CONFIGS[config_name])
    measure(benchmark, decode, op=f"vq decode {resolution}px", provider=provider, mode="decode",
            shape=f"B{batch}", dtype=dtype, flops=2 * macs * batch, images=batch, baselines=(BASELINE,),
            rounds=ROUNDS, gpu=True, layout=None if config_name == "paper" else "tiny")
    benchmark.extra_info["GMACs/image"] = macs / 1e9
