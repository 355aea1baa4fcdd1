"""asymmetric_attention: queries over two key/value segments, [context ; self], with one softmax.

    out = softmax(q @ [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self]

q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D); k_self, v_self (B, H, Ls, D). In ENAT this is the
decoder's attention ([MASK] queries over [visible ; [MASK]] keys) and the reuse encoder's attention
(new tokens over [cached ; new] keys). The two segments are never concatenated: each contributes its
scores to one log-sum-exp and its values to one output.
"""

import math
import numbers

import torch

from .._library import register_router
from ..backends import Dispatcher
from . import _checks


def _accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Reference (plain PyTorch, fp32 accumulation; fp64 for fp64 inputs).


def _segment_scores(q, keys, scale):
    """[q @ k^T * scale for each key segment], in the accumulator dtype."""
    acc = _accumulator_dtype(q.dtype)
    qa = q.to(acc)
    return [torch.matmul(qa, k.to(acc).transpose(-1, -2)) * scale for k in keys]


def _row_max(s):
    return s.amax(dim=-1) if s.shape[-1] else s.new_full(s.shape[:-1], -math.inf)


def asymmetric_attention_reference(q, k_ctx, v_ctx, k_self, v_self, scale):
    """Returns out (B, H, Lq, D) in q's dtype and lse (B, H, Lq) in the accumulator dtype."""
    scores = _segment_scores(q, (k_ctx, k_self), scale)
    m = torch.maximum(*(_row_max(s) for s in scores)).unsqueeze(-1)  # max over both segments
    p = [torch.exp(s - m) for s in scores]
    denom = p[0].sum(dim=-1, keepdim=True) + p[1].sum(dim=-1, keepdim=True)
    out = sum(torch.matmul(pi, v.to(pi.dtype)) for pi, v in zip(p, (v_ctx, v_self))) / denom
    return out.to(q.dtype), (m + torch.log(denom)).squeeze(-1)


def asymmetric_attention_backward_reference(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale):
    """(dq, dk_ctx, dv_ctx, dk_self, dv_self) from the saved out and lse (softmax recomputed)."""
    acc = lse.dtype
    do = grad_out.to(acc)
    delta = (do * out.to(acc)).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
    qa = q.to(acc)
    dq = 0
    grads = []
    for s, k, v in zip(_segment_scores(q, (k_ctx, k_self), scale), (k_ctx, k_self), (v_ctx, v_self)):
        p = torch.exp(s - lse.unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, v.to(acc).transpose(-1, -2)) - delta)
        dq = dq + torch.matmul(ds, k.to(acc)) * scale
        dk = torch.matmul(ds.transpose(-1, -2), qa) * scale
        grads += [dk.to(k.dtype), dv.to(v.dtype)]
    return (dq.to(q.dtype), *grads)


# Dispatch, registration, autograd. The Triton and CUDA kernels register here as they are added.

FORWARD = Dispatcher("asymmetric_attention")
FORWARD.register("reference", asymmetric_attention_reference)

BACKWARD = Dispatcher("asymmetric_attention_backward")
BACKWARD.register("reference", asymmetric_attention_backward_reference)


def _forward_router(q, k_ctx, v_ctx, k_self, v_self, scale, backend):
    return FORWARD.run(backend, q.device, q, k_ctx, v_ctx, k_self, v_self, scale)


def _backward_router(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, backend):
    return BACKWARD.run(backend, q.device, grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale)


register_router("asymmetric_attention", _forward_router)
register_router("asymmetric_attention_backward", _backward_router)


@torch.library.register_fake("enat::asymmetric_attention")
def _forward_fake(q, k_ctx, v_ctx, k_self, v_self, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=_accumulator_dtype(q.dtype)
    )


@torch.library.register_fake("enat::asymmetric_attention_backward")
def _backward_fake(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k_ctx, v_ctx, k_self, v_self))


def _setup(ctx, inputs, output):
    q, k_ctx, v_ctx, k_self, v_self, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k_ctx, v_ctx, k_self, v_self, out, lse)
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k_ctx, v_ctx, k_self, v_self, out, lse = ctx.saved_tensors
    args = (grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, ctx.scale)
    chosen = BACKWARD.select(None, q.device, *args, preferred=ctx.backend)
    grads = torch.ops.enat.asymmetric_attention_backward(*args, chosen)
    return (*grads, None, None)


torch.library.register_autograd("enat::asymmetric_attention", _backward, setup_context=_setup)


# Public API.


def asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self, scale=None, *, return_lse=False, backend=None):
    """softmax(q @ [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self], without concatenating.

    q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D); k_self, v_self (B, H, Ls, D); one dtype (fp16,
    bf16, fp32; fp64 on the reference backend) and device; any strides. Lc or Ls may be 0, not both.
    scale defaults to D**-0.5. Returns out (B, H, Lq, D) in the input dtype, and with return_lse also
    the log-sum-exp (B, H, Lq) in fp32 (fp64 for fp64 inputs).
    """
    tensors = dict(q=q, k_ctx=k_ctx, v_ctx=v_ctx, k_self=k_self, v_self=v_self)
    for name, layout in (("q", "B H Lq D"), ("k_ctx", "B H Lc D"), ("v_ctx", "B H Lc D")):
        _checks.tensor(name, tensors[name], layout)
    for name in ("k_self", "v_self"):
        _checks.tensor(name, tensors[name], "B H Ls D")
    _checks.dtype_in("q", q, _checks.FLOAT_DTYPES)
    _checks.same_dtype(**tensors)
    _checks.same_device(**tensors)
    for name in ("k_ctx", "v_ctx", "k_self", "v_self"):
        for dim in (0, 1, 3):
            _checks.size_equal(name, tensors[name], dim, "q", q, dim)
    _checks.size_equal("v_ctx", v_ctx, 2, "k_ctx", k_ctx, 2)
    _checks.size_equal("v_self", v_self, 2, "k_self", k_self, 2)
    if k_ctx.shape[2] + k_self.shape[2] == 0:
        raise ValueError(
            f"k_ctx and k_self are both empty (Lc = Ls = 0): every query needs at least one key; "
            f"got k_ctx: {_checks.describe(k_ctx)}, k_self: {_checks.describe(k_self)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    chosen = FORWARD.select(backend, q.device, q, k_ctx, v_ctx, k_self, v_self, float(scale))
    out, lse = torch.ops.enat.asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self, float(scale), chosen)
    return (out, lse) if return_lse else out
