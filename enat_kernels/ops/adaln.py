"""adaln and residual_adaln: the adaLN steps of a DiT block (enat/model.py, Block), fused.

    adaln(x, shift, scale)                  out = (x - mean) * rstd * (1 + scale[b]) + shift[b]
    residual_adaln(x, y, gate, shift, scale) x_new = x + gate[b] * y,  out = adaln(x_new, shift, scale)

x, y (B, L, d); gate, shift, scale (B, d), one row per batch row (views of the chunks of the
label embedding's (B, 8d) modulation are fine). mean and the biased variance are taken over d in
fp32, without affine weights (LayerNorm(d, elementwise_affine=False), eps 1e-6 in the model). x_new
is computed in fp32 and rounded once to x's dtype; out normalises that rounded x_new. Outputs are
contiguous, in x's dtype. Both ops are differentiable in every float input.

Backends: the reference (plain PyTorch, fp32 statistics; fp64 for fp64 inputs), Triton, and the C++
CPU kernels (forward; fp32 and fp64). There is no CUDA C++ kernel for these ops.
"""

import math
import numbers

import torch

from .. import _library, triton_utils
from .._library import define
from ..backends import Dispatcher, Entry
from .. import checks as _checks

triton, tl = triton_utils.triton, triton_utils.tl


def _accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Reference (plain PyTorch).


def _normalized(x, eps):
    """(xhat, rstd) of the rows of x, in x's dtype (the accumulator dtype): xhat = (x - mean) * rstd."""
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    return xc * rstd, rstd


def _normalized_grad(g, xhat, rstd, scale):
    """The gradient reaching the normalised rows from g = d out: the LayerNorm backward of g * (1 + scale)."""
    gx = g * (1 + scale[:, None])
    return rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))


def adaln_reference(x, shift, scale, eps):
    # PyTorch's fused LayerNorm (one pass on a CPU), then the modulation in the order the unfused model
    # writes it, so that in fp32 the result is that of F.layer_norm + modulate bit for bit. Half
    # precision inputs are computed in fp32 and rounded once.
    acc = _accumulator_dtype(x.dtype)
    if x.dtype != acc:
        return adaln_reference(x.to(acc), shift.to(acc), scale.to(acc), eps).to(x.dtype)
    xhat = torch.layer_norm(x, x.shape[-1:], None, None, eps)
    return xhat * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln_backward_reference(grad_out, x, scale, eps):
    """(dx, dshift, dscale), the statistics recomputed from x."""
    acc = _accumulator_dtype(x.dtype)
    g = grad_out.to(acc)
    xhat, rstd = _normalized(x.to(acc), eps)
    dx = _normalized_grad(g, xhat, rstd, scale.to(acc))
    return dx.to(x.dtype).contiguous(), g.sum(1).to(scale.dtype), (g * xhat).sum(1).to(scale.dtype)


def residual_adaln_reference(x, y, gate, shift, scale, eps):
    acc = _accumulator_dtype(x.dtype)
    if x.dtype == acc:
        x_new = torch.addcmul(x, gate.unsqueeze(1), y).contiguous()
    else:
        x_new = torch.addcmul(x.to(acc), gate.to(acc).unsqueeze(1), y.to(acc)).to(x.dtype).contiguous()
    return x_new, adaln_reference(x_new, shift, scale, eps)


def residual_adaln_backward_reference(grad_x_new, grad_out, x_new, y, gate, scale, eps):
    """(dx, dy, dgate, dshift, dscale) from the saved x_new."""
    acc = _accumulator_dtype(x_new.dtype)
    g = grad_out.to(acc)
    xhat, rstd = _normalized(x_new.to(acc), eps)
    dx = grad_x_new.to(acc) + _normalized_grad(g, xhat, rstd, scale.to(acc))
    dy = gate.to(acc)[:, None] * dx
    dgate = (dx * y.to(acc)).sum(1)
    return (dx.to(x_new.dtype).contiguous(), dy.to(y.dtype).contiguous(), dgate.to(gate.dtype),
            g.sum(1).to(scale.dtype), (g * xhat).sum(1).to(scale.dtype))


# Triton. A program holds [BLOCK_L, BLOCK_D] tiles of rows of one batch row b: BLOCK_D is d rounded up
# to a power of two (a constexpr: a row is one vectorised access, no loop over d), BLOCK_L rows so that
# a tile holds about FORWARD_TILE (BACKWARD_TILE) elements, at most L rounded up. The modulation rows
# of b (shift, scale, gate) are loaded once per program. Math is fp32; offsets are 64-bit.
# Forward: grid (row tiles, B), one tile per program; mean and variance from the tile in registers, so
# x (and y) are read once and x_new and out written in the same program.
# Backward: grid (P, B) with P programs per batch row (enough programs in all to fill the GPU, at most
# one per row tile); program j walks row tiles j, j + P, ... of b, recomputing each row's statistics
# from x (x_new), writing dx (dy), and summing dshift, dscale (dgate) over its rows in fp32 registers.
# Its sums go to its own slot of an fp32 (3, B, P, d) buffer, which one torch.sum over P finishes: no
# atomics, the same result on every run.

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_D = 8192
TRITON_MAX_B = 65535  # grid axis 1
FORWARD_TILE = 8192  # elements of x per program: 16 KB of fp16 read, as much written (twice that fused)
BACKWARD_TILE = 4096  # elements per tile of the backward, which holds several tiles at once
PROGRAMS_PER_SM = 4

if triton is not None:

    @triton.jit
    def _tile(ptr, stride_b, stride_l, b, rows, cols, mask):
        return tl.load(ptr + b * stride_b + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _row(ptr, stride_b, b, cols, D):
        return tl.load(ptr + b * stride_b + cols, mask=cols < D, other=0.0).to(tl.float32)

    @triton.jit
    def _statistics(x, mask, D, eps):
        """(xhat, rstd) of the rows of the fp32 tile x, whose masked entries are 0 (xhat 0 there too,
        also in rows past L, whose rstd is 1 / sqrt(eps), inf for eps = 0)."""
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, 1) / D + eps)
        return tl.where(mask, xc * rstd[:, None], 0.0), rstd

    @triton.jit
    def _adaln_fwd_kernel(
        x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, x_new_ptr, out_ptr, L, D, eps,
        sx_b, sx_l, sy_b, sy_l, sg_b, ssh_b, ssc_b, sn_b, sn_l, so_b, so_l,
        RESIDUAL: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < L) & (cols[None, :] < D)
        x = _tile(x_ptr, sx_b, sx_l, b, rows, cols, mask).to(tl.float32)
        if RESIDUAL:
            y = _tile(y_ptr, sy_b, sy_l, b, rows, cols, mask).to(tl.float32)
            x_new = (x + _row(gate_ptr, sg_b, b, cols, D)[None, :] * y).to(x_new_ptr.dtype.element_ty)
            tl.store(x_new_ptr + b * sn_b + rows[:, None] * sn_l + cols[None, :], x_new, mask=mask)
            x = x_new.to(tl.float32)
        xhat, _ = _statistics(x, mask, D, eps)
        out = xhat * (1.0 + _row(scale_ptr, ssc_b, b, cols, D))[None, :] + _row(shift_ptr, ssh_b, b, cols, D)[None, :]
        tl.store(out_ptr + b * so_b + rows[:, None] * so_l + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adaln_bwd_kernel(
        dout_ptr, dnew_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, dx_ptr, dy_ptr, part_ptr, L, D, eps,
        sdo_b, sdo_l, sdn_b, sdn_l, sx_b, sx_l, sy_b, sy_l, sg_b, ssc_b, sdx_b, sdx_l, sdy_b, sdy_l, sp_k, sp_b,
        RESIDUAL: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        j = tl.program_id(0)
        P = tl.num_programs(0)
        b = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        scale1 = 1.0 + _row(scale_ptr, ssc_b, b, cols, D)
        if RESIDUAL:
            gate = _row(gate_ptr, sg_b, b, cols, D)
        dshift = tl.zeros([BLOCK_D], tl.float32)
        dscale = tl.zeros([BLOCK_D], tl.float32)
        dgate = tl.zeros([BLOCK_D], tl.float32)
        for start in range(j * BLOCK_L, L, P * BLOCK_L):
            rows = start + tl.arange(0, BLOCK_L).to(tl.int64)
            mask = (rows[:, None] < L) & (cols[None, :] < D)
            xhat, rstd = _statistics(_tile(x_ptr, sx_b, sx_l, b, rows, cols, mask).to(tl.float32), mask, D, eps)
            g = _tile(dout_ptr, sdo_b, sdo_l, b, rows, cols, mask).to(tl.float32)
            dshift += tl.sum(g, 0)
            dscale += tl.sum(g * xhat, 0)
            gx = g * scale1[None, :]
            dx = (gx - (tl.sum(gx, 1) / D)[:, None] - xhat * (tl.sum(gx * xhat, 1) / D)[:, None]) * rstd[:, None]
            if RESIDUAL:
                dx += _tile(dnew_ptr, sdn_b, sdn_l, b, rows, cols, mask).to(tl.float32)
                y = _tile(y_ptr, sy_b, sy_l, b, rows, cols, mask).to(tl.float32)
                dgate += tl.sum(tl.where(mask, dx * y, 0.0), 0)  # dx is not finite in rows past L when eps = 0
                tl.store(dy_ptr + b * sdy_b + rows[:, None] * sdy_l + cols[None, :],
                         (gate[None, :] * dx).to(dy_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + b * sdx_b + rows[:, None] * sdx_l + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        part = part_ptr + b * sp_b + j.to(tl.int64) * D + cols
        tl.store(part, dshift, mask=cols < D)
        tl.store(part + sp_k, dscale, mask=cols < D)
        if RESIDUAL:
            tl.store(part + 2 * sp_k, dgate, mask=cols < D)


def _tile_shape(L, D, elements):
    """(BLOCK_L, BLOCK_D, num_warps) for tiles of about `elements` elements of rows of D."""
    block_d = max(16, triton.next_power_of_2(D))
    block_l = max(1, min(elements // block_d, triton.next_power_of_2(max(L, 1))))
    return block_l, block_d, max(1, min(16, block_l * block_d // 1024))


def _bl_strides(*tensors):
    return [s for t in tensors for s in t.stride()[:2]]


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _forward_triton(x, y, gate, shift, scale, eps, *, block_l=None):
    """(x_new or None, out); `block_l` overrides the rows per program (tests use it)."""
    B, L, D = x.shape
    residual = y is not None
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    x_new = torch.empty_like(out) if residual else None
    if out.numel() == 0:
        return x_new, out
    rows, block_d, warps = _tile_shape(L, D, FORWARD_TILE)
    rows = block_l or rows
    y, gate = (y, gate) if residual else (x, shift)  # unread placeholders when not residual
    new = x_new if residual else out
    _adaln_fwd_kernel[(triton.cdiv(L, rows), B)](
        x, y, gate, shift, scale, new, out, L, D, eps, *_bl_strides(x, y), gate.stride(0), shift.stride(0),
        scale.stride(0), *_bl_strides(new, out), RESIDUAL=residual, BLOCK_L=rows, BLOCK_D=block_d, num_warps=warps,
    )
    return x_new, out


def _programs_per_row(B, tiles, device):
    """Programs per batch row of the backward: about PROGRAMS_PER_SM per SM in all, at most one per tile."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * sms, B)))


def _backward_triton(grad_x_new, grad_out, x, y, gate, scale, eps, *, block_l=None, programs=None):
    """(dx, dy or None, dgate or None, dshift, dscale); `block_l` and `programs` (per batch row) override
    the tiling (tests use them)."""
    B, L, D = x.shape
    residual = y is not None
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    dy = torch.empty_like(dx) if residual else None
    if B * D == 0 or L == 0:
        zeros = [scale.new_zeros((B, D)) for _ in range(3)]
        return dx, dy, zeros[0] if residual else None, zeros[1], zeros[2]
    rows, block_d, warps = _tile_shape(L, D, BACKWARD_TILE)
    rows = block_l or rows
    P = programs or _programs_per_row(B, triton.cdiv(L, rows), x.device)
    parts = torch.empty((3 if residual else 2, B, P, D), dtype=torch.float32, device=x.device)
    grad_out = _last_dim_contiguous(grad_out)  # autograd may hand over an expanded gradient
    if residual:
        grad_x_new = _last_dim_contiguous(grad_x_new)
    else:
        grad_x_new, y, gate, dy = grad_out, x, scale, dx  # unread placeholders
    _adaln_bwd_kernel[(P, B)](
        grad_out, grad_x_new, x, y, gate, scale, dx, dy, parts, L, D, eps,
        *_bl_strides(grad_out, grad_x_new, x, y), gate.stride(0), scale.stride(0), *_bl_strides(dx, dy),
        parts.stride(0), parts.stride(1), RESIDUAL=residual, BLOCK_L=rows, BLOCK_D=block_d, num_warps=warps,
    )
    sums = [p.sum(dim=1).to(scale.dtype) for p in parts]  # (B, d) each, in separate storage
    return (dx, dy, sums[2], sums[0], sums[1]) if residual else (dx, None, None, sums[0], sums[1])


def adaln_triton(x, shift, scale, eps):
    return _forward_triton(x, None, None, shift, scale, eps)[1]


def adaln_backward_triton(grad_out, x, scale, eps):
    dx, _, _, dshift, dscale = _backward_triton(None, grad_out, x, None, None, scale, eps)
    return dx, dshift, dscale


def residual_adaln_triton(x, y, gate, shift, scale, eps):
    return _forward_triton(x, y, gate, shift, scale, eps)


def residual_adaln_backward_triton(grad_x_new, grad_out, x_new, y, gate, scale, eps):
    return _backward_triton(grad_x_new, grad_out, x_new, y, gate, scale, eps)


def _triton_why_not(**tensors):
    """The Triton kernels' limits: dtype, d, B, and rows contiguous in their last dimension."""
    x = next(iter(tensors.values()))
    B, D = x.shape[0], x.shape[-1]
    reasons = _checks.dtype_reasons("the Triton adaLN kernels", x, TRITON_DTYPES)
    if D > TRITON_MAX_D:
        reasons.append(f"d = {D} is above the Triton adaLN kernels' {TRITON_MAX_D}")
    if B > TRITON_MAX_B:
        reasons.append(f"B = {B} is above the Triton adaLN kernels' {TRITON_MAX_B}")
    return reasons + _checks.strided_rows_reasons(**tensors)


# CPU (csrc/cpu/kernels.cpp): forward only, fp32 and fp64, one pass of C++ per row (statistics, then
# the normalised, modulated row; x_new first for residual_adaln) in place of the reference's several
# PyTorch calls.

CPU_DTYPES = (torch.float32, torch.float64)


def adaln_cpu(x, shift, scale, eps):
    return _library.CPU.adaln(x, shift, scale, eps)


def residual_adaln_cpu(x, y, gate, shift, scale, eps):
    return _library.CPU.residual_adaln(x, y, gate, shift, scale, eps)


def _cpu_why_not(**tensors):
    """The CPU kernels' limits: dtype, and rows contiguous in their last dimension."""
    x = next(iter(tensors.values()))
    return _checks.dtype_reasons("the CPU adaLN kernels", x, CPU_DTYPES) + _checks.strided_rows_reasons(**tensors)


# Dispatch, registration, autograd.

ADALN = Dispatcher("adaln")
ADALN.register("reference", adaln_reference)
ADALN.register("triton", adaln_triton, lambda x, shift, scale, eps: _triton_why_not(x=x, shift=shift, scale=scale))
ADALN.register("cpu", adaln_cpu, lambda x, shift, scale, eps: _cpu_why_not(x=x, shift=shift, scale=scale))

ADALN_BACKWARD = Dispatcher("adaln_backward")
ADALN_BACKWARD.register("reference", adaln_backward_reference)
ADALN_BACKWARD.register("triton", adaln_backward_triton,
                        lambda grad_out, x, scale, eps: _triton_why_not(x=x, scale=scale))

RESIDUAL_ADALN = Dispatcher("residual_adaln")
RESIDUAL_ADALN.register("reference", residual_adaln_reference)
RESIDUAL_ADALN.register("triton", residual_adaln_triton, lambda x, y, gate, shift, scale, eps: _triton_why_not(
    x=x, y=y, gate=gate, shift=shift, scale=scale))
RESIDUAL_ADALN.register("cpu", residual_adaln_cpu, lambda x, y, gate, shift, scale, eps: _cpu_why_not(
    x=x, y=y, gate=gate, shift=shift, scale=scale))

RESIDUAL_ADALN_BACKWARD = Dispatcher("residual_adaln_backward")
RESIDUAL_ADALN_BACKWARD.register("reference", residual_adaln_backward_reference)
RESIDUAL_ADALN_BACKWARD.register(
    "triton", residual_adaln_backward_triton,
    lambda grad_x_new, grad_out, x_new, y, gate, scale, eps: _triton_why_not(x_new=x_new, y=y, gate=gate, scale=scale))


def _adaln_router(x, shift, scale, eps, backend):
    return ADALN.run(backend, x.device, x, shift, scale, eps)


def _adaln_backward_router(grad_out, x, scale, eps, backend):
    return ADALN_BACKWARD.run(backend, x.device, grad_out, x, scale, eps)


def _residual_router(x, y, gate, shift, scale, eps, backend):
    return RESIDUAL_ADALN.run(backend, x.device, x, y, gate, shift, scale, eps)


def _residual_backward_router(grad_x_new, grad_out, x_new, y, gate, scale, eps, backend):
    return RESIDUAL_ADALN_BACKWARD.run(backend, x_new.device, grad_x_new, grad_out, x_new, y, gate, scale, eps)


def _like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _adaln_fake(x, shift, scale, eps, backend):
    return _like(x)


def _adaln_backward_fake(grad_out, x, scale, eps, backend):
    return _like(x), _like(scale), _like(scale)


def _residual_fake(x, y, gate, shift, scale, eps, backend):
    return _like(x), _like(x)


def _residual_backward_fake(grad_x_new, grad_out, x_new, y, gate, scale, eps, backend):
    return _like(x_new), _like(y), _like(gate), _like(scale), _like(scale)


define("adaln(Tensor x, Tensor shift, Tensor scale, float eps, str backend) -> Tensor", _adaln_router, _adaln_fake)
define("adaln_backward(Tensor grad_out, Tensor x, Tensor scale, float eps, str backend) -> (Tensor, Tensor, Tensor)",
       _adaln_backward_router, _adaln_backward_fake)
define("residual_adaln(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps, str backend) "
       "-> (Tensor, Tensor)", _residual_router, _residual_fake)
define("residual_adaln_backward(Tensor grad_x_new, Tensor grad_out, Tensor x_new, Tensor y, Tensor gate, "
       "Tensor scale, float eps, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
       _residual_backward_router, _residual_backward_fake)


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, eps, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.backend = eps, backend


def _adaln_backward(ctx, grad_out):
    x, scale = ctx.saved_tensors
    args = (grad_out, x, scale, ctx.eps)
    chosen = ADALN_BACKWARD.select(None, x.device, *args, preferred=ctx.backend)
    dx, dshift, dscale = torch.ops.enat.adaln_backward(*args, chosen)
    return dx, dshift, dscale, None, None


def _residual_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps, backend = inputs
    ctx.save_for_backward(output[0], y, gate, scale)
    ctx.eps, ctx.backend = eps, backend


def _residual_backward(ctx, grad_x_new, grad_out):
    x_new, y, gate, scale = ctx.saved_tensors
    if grad_x_new is None:
        grad_x_new = torch.zeros_like(x_new)
    if grad_out is None:
        grad_out = torch.zeros_like(x_new)
    args = (grad_x_new, grad_out, x_new, y, gate, scale, ctx.eps)
    chosen = RESIDUAL_ADALN_BACKWARD.select(None, x_new.device, *args, preferred=ctx.backend)
    return (*torch.ops.enat.residual_adaln_backward(*args, chosen), None, None)


torch.library.register_autograd("enat::adaln", _adaln_backward, setup_context=_adaln_setup)
torch.library.register_autograd("enat::residual_adaln", _residual_backward, setup_context=_residual_setup)


# Public API.


def _check(tensors, rows, eps):
    """Check the arguments (errors name them): `tensors` are x (and y), then the (B, d) rows.
    Returns eps as a float."""
    (x_name, x), *_ = tensors.items()
    for name, t in tensors.items():
        _checks.tensor(name, t, "B d" if name in rows else "B L d")
    _checks.dtype_in(x_name, x, _checks.FLOAT_DTYPES)
    _checks.same_dtype(**tensors)
    _checks.same_device(**tensors)
    for name, t in tensors.items():
        if name == x_name:
            continue
        dims = (0, 1) if name in rows else (0, 1, 2)
        for dim in dims:
            _checks.size_equal(name, t, dim, x_name, x, 2 if name in rows and dim == 1 else dim)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def adaln(x, shift, scale, *, eps=1e-6, backend=None):
    """LayerNorm over d without affine weights, then modulation: x (B, L, d); shift, scale (B, d).

    Returns (x - mean) * rstd * (1 + scale[:, None]) + shift[:, None], (B, L, d) contiguous in x's
    dtype (fp16, bf16, fp32; fp64 on the reference backend), statistics in fp32. Any strides; the
    Triton kernel needs each tensor contiguous in its last dimension.
    """
    return _ADALN(x, shift, scale, eps, backend=backend)


def residual_adaln(x, y, gate, shift, scale, *, eps=1e-6, backend=None):
    """The gated residual, then adaln of it: x, y (B, L, d); gate, shift, scale (B, d).

    Returns (x_new, out), both (B, L, d) contiguous in x's dtype: x_new = x + gate[:, None] * y
    (computed in fp32, rounded once) and out = adaln(x_new, shift, scale, eps=eps).
    """
    return _RESIDUAL_ADALN(x, y, gate, shift, scale, eps, backend=backend)


_ADALN = Entry(ADALN, lambda x, shift, scale, eps: (
    x, shift, scale, _check(dict(x=x, shift=shift, scale=scale), ("shift", "scale"), eps)))
_RESIDUAL_ADALN = Entry(RESIDUAL_ADALN, lambda x, y, gate, shift, scale, eps: (
    x, y, gate, shift, scale, _check(dict(x=x, y=y, gate=gate, shift=shift, scale=scale), ("gate", "shift", "scale"), eps)))
