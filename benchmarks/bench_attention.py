"""asymmetric_attention against the ways PyTorch code does the same thing, at the model's own shapes.

Shapes (GPU): ENAT-L, H=16, D=64.
- Generation: every (Lq, Lc, Ls) that an 8-step ENAT-L generation runs at 256 px (L=256) and 512 px
  (L=1024), with B=256 rows (128 images and their classifier-free guidance rows). With n_k the [MASK]
  count before step k (enat.schedule.mask_schedule), step k's decoder attends Lq=n_k [MASK] queries
  over Lc=L-n_k visible keys plus Ls=n_k self keys; at reuse steps k >= 1 the encoder attends the
  Lq=n_{k-1}-n_k critical tokens over the Lc=L-n_{k-1} cached tokens plus Ls=Lq self keys (step 0 has
  no encoder call: nothing is visible). Forward only. bench_trajectory_matches_model checks these
  against the attention calls of a small model's generation.
- Training, mask ratio 0.8, B=128: the decoder (Lq=round(0.8 L), Lc=L-Lq, Ls=Lq) and the encoder over
  the visible tokens (Lq=L-round(0.8 L), Lc=0, Ls=Lq); forward, backward, forward+backward.
- Tiny: B1 H1 Lq8 Lc8 Ls8 D64, where the host path (eager latency) is what shows.
Layouts: "model" passes the views the model makes (q, k_self, v_self: slices of one (B, L, 3, H, D)
projection, transposed; k_ctx, v_ctx: slices of a (B, L, 2, H, D) projection, transposed), to every provider, the
pre-concatenated K/V included; "contiguous" passes (B, H, L, D) tensors. On a CPU: B=2, H=2, L=64.

Providers: enat-auto (the dispatcher's choice, what users get), enat-triton, enat-cuda (CUDA forward;
its backward is the Triton one), cat+sdpa (torch.cat, then F.scaled_dot_product_attention), sdpa
(concatenated) (K/V concatenated before timing: the floor for any two-segment kernel; SDPA picks its
backend), naive (paper) (enat.paper_style: concatenate, matmul, softmax, matmul). Backward is
torch.autograd.grad of the output with a fixed gradient (in the layout the model hands it over), w.r.t.
the tensors the provider receives: for sdpa (concatenated) the pre-concatenated K/V, so that its
fwd+bwd is SDPA's own forward and backward, the floor the contract's 1.15x target is measured against.

The GPU check runs the cases not marked `extended`: generation shapes in fp16 (model layout), training
shapes in fp16 and bf16 (model layout, fwd and fwd+bwd), tiny shapes. `make bench` runs all of them.
"""

import pytest
import torch
import torch.nn.functional as F

import enat
import enat_kernels.ops as K
from enat.config import ENATConfig
from enat.model import KernelOps
from enat.paper_style import PaperStyleOps
from enat.schedule import attention_shapes
from harness import DEVICE, ON_GPU, dtype_name, extended, measure

STEPS = 8
TRAIN_MASK_RATIO = 0.8
if ON_GPU:
    H, D = 16, 64
    SAMPLE_B, TRAIN_B = 256, 128
    SEQ_LENS = {256: 256, 512: 1024}  # resolution (px): tokens
    SAMPLE_DTYPES, TRAIN_DTYPES = [torch.float16, torch.bfloat16], [torch.float16, torch.bfloat16]
    CHECK_DTYPE = torch.float16  # generation dtype in the GPU check (both dtypes for training)
else:
    H, D = 2, 64
    SAMPLE_B, TRAIN_B = 2, 2
    SEQ_LENS = {128: 64}
    SAMPLE_DTYPES = TRAIN_DTYPES = [torch.float32]
    CHECK_DTYPE = torch.float32

OP = "asymmetric_attention"
FLOOR = "sdpa (concatenated)"
BASELINES = (FLOOR, "cat+sdpa", "naive (paper)")


def training_shapes(L, ratio=TRAIN_MASK_RATIO):
    masked = round(ratio * L)
    return [("train dec", masked, L - masked, masked), ("train enc", L - masked, 0, L - masked)]


def _case(role, B, Lq, Lc, Ls, dtype, layout, mode, check):
    return pytest.param(role, B, Lq, Lc, Ls, dtype, layout, mode, marks=() if check else extended,
                        id=f"{role.replace(' ', '-')}-B{B}-Lq{Lq}-Lc{Lc}-Ls{Ls}-{dtype_name(dtype)}-{layout}-{mode}")


def _cases():
    """pytest params (role, B, Lq, Lc, Ls, dtype, layout, mode); those of the GPU check unmarked."""
    cases = []
    for px, L in SEQ_LENS.items():
        for role, *lengths in attention_shapes(L, STEPS):
            for dtype in SAMPLE_DTYPES:
                for layout in ("model", "contiguous"):
                    check = dtype == CHECK_DTYPE and layout == "model"
                    cases.append(_case(f"{px}px {role}", SAMPLE_B, *lengths, dtype, layout, "fwd", check))
        for role, *lengths in training_shapes(L):
            for dtype in TRAIN_DTYPES:
                for layout in ("model", "contiguous"):
                    for mode in ("fwd", "bwd", "fwd+bwd"):
                        check = layout == "model" and mode != "bwd"
                        cases.append(_case(f"{px}px {role}", TRAIN_B, *lengths, dtype, layout, mode, check))
    return cases


def _cat_sdpa(q, k_ctx, v_ctx, k_self, v_self):
    return F.scaled_dot_product_attention(q, torch.cat([k_ctx, k_self], 2), torch.cat([v_ctx, v_self], 2))


PROVIDERS = {
    "enat-auto": K.asymmetric_attention,
    "enat-triton": lambda *a: K.asymmetric_attention(*a, backend="triton"),
    "enat-cuda": lambda *a: K.asymmetric_attention(*a, backend="cuda"),
    "cat+sdpa": _cat_sdpa,
    FLOOR: None,  # SDPA on K/V concatenated before timing
    "naive (paper)": PaperStyleOps.attention,
}


def _projection(B, H, n, parts, dtype):
    """A Linear's output (B, n, parts * H * D) viewed (B, n, parts, H, D)."""
    return torch.randn(B, n, parts * H * D, device=DEVICE, dtype=dtype).view(B, n, parts, H, D)


def _heads(t, part):
    """(B, n, parts, H, D) -> (B, H, n, D) view of one part, as enat.model.Attention makes it."""
    return t[:, :, part].transpose(1, 2)


def make_inputs(B, H, Lq, Lc, Ls, dtype, layout, requires_grad=False):
    """q, k_ctx, v_ctx, k_self, v_self and the pre-concatenated (k, v) in the given layout."""
    if layout == "model":
        if Lq != Ls:
            raise ValueError(f"the model's queries are its self tokens (Lq == Ls), got Lq={Lq}, Ls={Ls}")
        qkv, kv_ctx = _projection(B, H, Lq, 3, dtype), _projection(B, H, Lc, 2, dtype)
        kv = torch.cat([kv_ctx, qkv[:, :, 1:]], 1)  # as if one projection of [context ; self] tokens
        for t in (qkv, kv_ctx, kv):
            t.requires_grad_(requires_grad)
        args = (_heads(qkv, 0), _heads(kv_ctx, 0), _heads(kv_ctx, 1), _heads(qkv, 1), _heads(qkv, 2))
        return args, (_heads(kv, 0), _heads(kv, 1))
    if layout != "contiguous":
        raise ValueError(layout)
    args = [torch.randn(B, H, n, D, device=DEVICE, dtype=dtype) for n in (Lq, Lc, Lc, Ls, Ls)]
    kv = [torch.cat([args[1], args[3]], 2), torch.cat([args[2], args[4]], 2)]
    for t in (*args, *kv):
        t.requires_grad_(requires_grad)
    return tuple(args), tuple(kv)


def _run(benchmark, provider, mode, role, B, H, Lq, Lc, Ls, dtype, layout):
    grads = mode != "fwd"
    args, (k, v) = make_inputs(B, H, Lq, Lc, Ls, dtype, layout, requires_grad=grads)
    if provider == FLOOR:
        inputs = (args[0], k, v)

        def attend():
            return F.scaled_dot_product_attention(args[0], k, v)
    else:
        inputs = args

        def attend():
            return PROVIDERS[provider](*args)

    # The output's gradient in the layout the model hands it over: its merge of the heads is a (B, Lq, H * D)
    # view, so the gradient arrives as (B, Lq, H, D) memory; in the contiguous layout as (B, H, Lq, D).
    grad = torch.randn(B, Lq, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    if layout == "contiguous":
        grad = grad.contiguous()
    if mode == "fwd":
        fn = attend
    elif mode == "fwd+bwd":
        def fn():
            return torch.autograd.grad(attend(), inputs, grad, allow_unused=True)
    else:  # bwd: the forward's graph kept from one call outside the timed region
        out = []

        def fn():
            if not out:
                out.append(attend())
            return torch.autograd.grad(out[0], inputs, grad, retain_graph=True, allow_unused=True)
    flops = 4 * B * H * Lq * (Lc + Ls) * D * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]  # bwd: 5 matmuls to 2
    with torch.set_grad_enabled(grads):
        measure(benchmark, fn, op=OP, provider=provider, mode=mode, shape=f"B{B} H{H} D{D} Lq{Lq} Lc{Lc} Ls{Ls}",
                dtype=dtype, layout=layout, role=role, flops=flops, baselines=BASELINES)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize(("role", "B", "Lq", "Lc", "Ls", "dtype", "layout", "mode"), _cases())
def bench_asymmetric_attention(benchmark, provider, role, B, Lq, Lc, Ls, dtype, layout, mode):
    _run(benchmark, provider, mode, role, B, H, Lq, Lc, Ls, dtype, layout)


TINY = (1, 1, 8, 8, 8)  # B, H, Lq, Lc, Ls


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", pytest.param("fwd+bwd", marks=extended)])
def bench_asymmetric_attention_tiny(benchmark, provider, mode):
    """The host path: at B1 H1 Lq8 Lc8 Ls8 D64 eager latency is launch and dispatch overhead."""
    _run(benchmark, provider, mode, "tiny", *TINY, torch.float16 if ON_GPU else torch.float32, "model")


def _record_attention_calls(cfg, batch=1):
    """{(Lq, Lc, Ls): strides of (q, k_ctx, k_self)} of the attention calls of one 8-step generation."""
    calls = {}

    def attention(q, k_ctx, v_ctx, k_self, v_self):
        calls.setdefault((q.shape[2], k_ctx.shape[2], k_self.shape[2]),
                         (q.shape[0], q.stride(), k_ctx.stride(), k_self.stride()))
        return KernelOps.attention(q, k_ctx, v_ctx, k_self, v_self)

    torch.manual_seed(0)
    model = enat.ENAT(cfg).eval()
    model.ops = type("RecordingOps", (KernelOps,), {"attention": staticmethod(attention)})
    enat.sample(model, torch.arange(batch) % 1000, steps=STEPS, generator=torch.Generator().manual_seed(0))
    return calls


@pytest.mark.parametrize("resolution", [128, 256])
def bench_trajectory_matches_model(resolution):
    """The generation shapes above are those of the model's attention calls, in the model's layout."""
    cfg = ENATConfig("probe", depth_enc=1, depth_dec=1, width=H * D, heads=H, resolution=resolution)
    calls = _record_attention_calls(cfg)
    expected = {(Lq, Lc, Ls) for _, Lq, Lc, Ls in attention_shapes(cfg.seq_len, STEPS)}
    assert set(calls) == expected, (sorted(calls), sorted(expected))
    for (Lq, Lc, Ls), (rows, q_stride, kc_stride, ks_stride) in calls.items():
        (q, k_ctx, _, k_self, _), _ = make_inputs(rows, H, Lq, Lc, Ls, torch.float32, "model")
        assert (q.stride(), k_ctx.stride(), k_self.stride()) == (q_stride, kc_stride, ks_stride)
