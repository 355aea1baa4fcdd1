"""Training steps: images/s and peak memory of one optimizer step of the paper's recipe (enat.training:
forward, label-smoothed loss on the masked tokens, backward through the kernels, AdamW, EMA update),
for ENAT-B and ENAT-L at 256 px, bf16 autocast, batch 128 per GPU.

Providers run the same weights and the same masks:
- `enat-kernels`: the model on enat_kernels.ops (asymmetric attention and token movement kernels, fused adaLN);
- `paper-style`: enat.paper_style.PaperStyleOps, the paper code's way (attention over concatenated
  K/V by matmul-softmax-matmul, boolean-mask indexing with its host syncs, separate norms);
- `torch-sdpa`: plain PyTorch done well (enat.torch_baseline.TorchOps, as in bench_model.py):
  scaled_dot_product_attention on concatenated K/V, rows moved with torch.gather / scatter at
  argsort positions (no host sync), F.layer_norm.
Two kinds of step, as the recipe alternates them: `plain` (mask ratio 0.8, all visible tokens encoded)
and `reuse` (the EMA model runs the previous step with a further half of the visible tokens masked, and
the trained model encodes only the critical tokens over prev_proj of the cached features); and, for
this package's kernels only (`extended`), `chain`: the longest chain of `reuse_steps=4` (three earlier
steps, each masking a further half of the visible tokens), the cost of that option.
Targets (README, "Benchmarks"; summarize.py checks them on a GPU): enat-kernels at least 1.5x
paper-style and ahead of torch-sdpa in images/s, for the plain and reuse steps; the peak memory of
each is recorded.

On a CPU only a tiny configuration runs (a smoke test with --benchmark-disable; a few rounds timed
otherwise): ENAT-B/L training steps are GPU work.
"""

import contextlib

import pytest
import torch

import enat
import enat.training as T
from enat.paper_style import PaperStyleOps
from enat.torch_baseline import TorchOps
from harness import DEVICE, ON_GPU, extended, measure

if ON_GPU:
    SIZES = ["ENAT-B", "ENAT-L"]
    BATCH, ROUNDS, AMP = 128, 5, torch.bfloat16
else:
    SIZES = ["tiny"]
    BATCH, ROUNDS, AMP = 4, 3, None
TINY = enat.ENATConfig("tiny", depth_enc=2, depth_dec=1, width=64, heads=4, resolution=128)
PROVIDERS = ["enat-kernels", "paper-style", "torch-sdpa"]
BASELINE = "paper-style"
RATIO, PREV_SHARE = 0.8, 0.5


def _masks(batch, L, kind):
    """The step's masks: `plain` without a previous step, `reuse` with one, `chain` with three before it."""
    g = torch.Generator().manual_seed(0)
    rank = torch.rand(batch, L, generator=g).argsort(1).argsort(1)
    n = round(L * RATIO)
    no_drop = torch.zeros(batch, dtype=torch.bool)
    if kind == "plain":
        return T.Masks(RATIO, rank < n, n, None, None, no_drop)
    counts = [n + round((L - n) * PREV_SHARE)]
    for _ in range(3 if kind == "chain" else 0):
        counts.append(counts[-1] + round((L - counts[-1]) * PREV_SHARE))
    earlier = tuple((rank < c, c) for c in reversed(counts[1:]))
    return T.Masks(RATIO, rank < n, n, rank < counts[0], counts[0], no_drop, earlier)


_STATE = {}


def _training_state(name):
    """(model, EMA, optimizer, scheduler) for a size, built once per session (the steps change the
    weights a little, which does not change the work)."""
    if name not in _STATE:
        _STATE.clear()
        cfg = TINY if name == "tiny" else enat.config(name)
        torch.manual_seed(0)
        model = enat.ENAT(cfg).to(DEVICE).train()
        _STATE[name] = (model, T.EMA(model), *T.optimizer(model, warmup=1))
    return _STATE[name]


@contextlib.contextmanager
def _ops(models, provider):
    """Within the block, `models` run with the provider's ops."""
    ops = {"enat-kernels": None, "paper-style": PaperStyleOps, "torch-sdpa": TorchOps}[provider]
    saved = [m.ops for m in models]
    try:
        for m in models:
            m.ops = ops or m.ops
        yield
    finally:
        for m, o in zip(models, saved):
            m.ops = o


CASES = [(kind, provider) for kind in ("plain", "reuse") for provider in PROVIDERS] + \
    [pytest.param("chain", "enat-kernels", marks=extended)]


@pytest.mark.parametrize("kind, provider", CASES)
@pytest.mark.parametrize("name", SIZES)
def bench_train_step(benchmark, name, kind, provider):
    model, ema, opt, sched = _training_state(name)
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_len), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = (torch.arange(BATCH) * 37 % cfg.num_classes).to(DEVICE)
    masks = _masks(BATCH, cfg.seq_len, kind)

    def step():
        with _ops((model, ema.model), provider):
            with torch.autocast("cuda", AMP or torch.bfloat16, enabled=AMP is not None):
                loss = T.loss_on_masks(model, ids, labels, masks, prev_model=ema.model)
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        return loss

    if ON_GPU:
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30
    measure(benchmark, step, op=f"train step {cfg.name} {cfg.resolution}px", provider=provider, mode=kind,
            shape=f"B{BATCH} L{cfg.seq_len}", dtype=AMP or torch.float32, images=BATCH, baselines=(BASELINE,),
            rounds=ROUNDS, gpu=False)
