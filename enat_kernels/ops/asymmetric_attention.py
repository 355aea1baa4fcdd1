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
from torch.utils.flop_counter import register_flop_formula

from .. import triton_utils
from .._library import register_cuda_fake, register_router
from ..backends import Dispatcher
from . import _checks

triton, tl = triton_utils.triton, triton_utils.tl

def _accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Reference (plain PyTorch, fp32 accumulation; fp64 for fp64 inputs).


def _segment_scores(q, keys, scale):
    """[q @ k^T * scale for each key segment], in the accumulator dtype."""
    acc = _accumulator_dtype(q.dtype)
    qa = q.to(acc)
    return [torch.matmul(qa, k.to(acc).transpose(-1, -2)) * scale for k in keys]


# PyTorch's fused CPU attention returns each segment's output and log-sum-exp without materialising
# the scores; an empty query set takes the general path (that kernel divides by zero on it).
_CPU_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_fused_attention(q, segments, scale):
    """Per-segment fused attention, combined by log-sum-exp: with l = logaddexp(l_ctx, l_self),
    out = o_self + exp(l_ctx - l) (o_ctx - o_self)."""
    parts = [_CPU_FUSED(q, k, v, scale=scale) for k, v in segments]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # contiguous, as the fake kernel says
    lse = q.new_empty(q.shape[:3])
    if len(parts) == 1:
        return out.copy_(parts[0][0]), lse.copy_(parts[0][1])
    (o_ctx, l_ctx), (o_self, l_self) = parts
    torch.logaddexp(l_ctx, l_self, out=lse)
    return torch.lerp(o_self, o_ctx, (l_ctx - lse).exp_().unsqueeze(-1), out=out), lse


def asymmetric_attention_reference(q, k_ctx, v_ctx, k_self, v_self, scale):
    """Returns out (B, H, Lq, D) in q's dtype and lse (B, H, Lq) in the accumulator dtype.

    Each non-empty segment contributes exp(scores - row max) to one denominator and its p @ v to
    one numerator; the segments are never joined. fp32 and fp64 CPU tensors run each segment through
    PyTorch's fused CPU attention and combine the two by their log-sum-exp."""
    segments = [(k, v) for k, v in ((k_ctx, v_ctx), (k_self, v_self)) if k.shape[2]]
    if (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and q.numel()
            and _CPU_FUSED is not None):
        return _cpu_fused_attention(q, segments, scale)
    acc = _accumulator_dtype(q.dtype)
    qa = q.to(acc) * scale
    segments = [(k.to(acc), v.to(acc)) for k, v in segments]
    scores = [torch.matmul(qa, k.transpose(-1, -2)) for k, _ in segments]
    m = scores[0].amax(dim=-1, keepdim=True)
    if len(scores) == 2:
        m = torch.maximum(m, scores[1].amax(dim=-1, keepdim=True))
    numerator = denominator = None
    for s, (_, v) in zip(scores, segments):
        p = s.sub_(m).exp_()
        if numerator is None:
            numerator, denominator = torch.matmul(p, v), p.sum(dim=-1, keepdim=True)
        else:
            numerator.add_(torch.matmul(p, v))
            denominator.add_(p.sum(dim=-1, keepdim=True))
    lse = m.squeeze(-1).add_(denominator.log().squeeze(-1))
    return numerator.div_(denominator).to(q.dtype), lse


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


# Triton: flash-style tiling, one online softmax over the context tiles then the self tiles, fp32
# accumulation, exp2 with log2(e) folded into the scale. The head dim is padded to a power of two
# >= 16 with masked loads. Offsets of batch, head and row are 64-bit. The backward recomputes the
# probabilities from lse: one kernel for delta = rowsum(dO * O), one launch per key segment for
# dK/dV (looping over query tiles), one for dQ (looping over both key segments); no atomics, so
# results are deterministic.

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_D = 128
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if triton is not None:

    @triton.jit
    def _batch_head(bh, H):
        return (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _tile(head_ptr, rows, stride_l, offs_d, mask):
        """The [len(rows), BLOCK_D] tile of one (batch, head)'s (L, D) matrix, zero where masked."""
        return tl.load(head_ptr + rows[:, None].to(tl.int64) * stride_l + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _fwd_segment(acc, m_i, l_i, q, k_ptr, v_ptr, length, stride_kl, stride_vl, offs_d, d_ok, qk_scale,
                     BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Fold one key segment into the running (acc, row max m_i, row sum l_i), log2 domain."""
        for start in range(0, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < length
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _tile(k_ptr, n, stride_kl, offs_d, kv_mask)
            v = _tile(v_ptr, n, stride_vl, offs_d, kv_mask)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.autotune(
        configs=triton_utils.autotune_configs(
            [
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
            ]
        ),
        key=["BLOCK_D", "PRECISION"],
    )
    @triton.jit
    def _attention_fwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, lse_ptr,
        H, Lq, Lc, Ls, D, qk_scale,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l, so_b, so_h, so_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        d_ok = offs_d < D
        rows = offs_m[:, None].to(tl.int64)
        q = _tile(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l, offs_d, m_ok[:, None] & d_ok[None, :])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, kc_ptr + b * skc_b + h * skc_h, vc_ptr + b * svc_b + h * svc_h,
                                     Lc, skc_l, svc_l, offs_d, d_ok, qk_scale, BLOCK_N, PRECISION)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, ks_ptr + b * sks_b + h * sks_h, vs_ptr + b * svs_b + h * svs_h,
                                     Ls, sks_l, svs_l, offs_d, d_ok, qk_scale, BLOCK_N, PRECISION)
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * so_b + h * so_h + rows * so_l + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def _bwd_delta_kernel(out_ptr, do_ptr, delta_ptr, H, Lq, D, so_b, so_h, so_l, sdo_b, sdo_h, sdo_l,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta = rowsum(dO * O), the softmax-backward correction, (B, H, Lq) fp32."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        mask = m_ok[:, None] & (offs_d[None, :] < D)
        o = _tile(out_ptr + b * so_b + h * so_h, offs_m, so_l, offs_d, mask)
        do = _tile(do_ptr + b * sdo_b + h * sdo_h, offs_m, sdo_l, offs_d, mask)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, delta, mask=m_ok)

    @triton.autotune(
        configs=triton_utils.autotune_configs(
            [
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
                triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=2),
            ]
        ),
        key=["BLOCK_D", "PRECISION"],
    )
    @triton.jit
    def _bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        H, Lq, Lk, D, qk_scale, scale,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l,
        sdk_b, sdk_h, sdk_l, sdv_b, sdv_h, sdv_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dK, dV of one key segment: a tile of keys against every query tile."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < Lk
        d_ok = offs_d < D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        keys = offs_n[:, None].to(tl.int64)
        k = _tile(k_ptr + b * sk_b + h * sk_h, offs_n, sk_l, offs_d, kv_mask)
        v = _tile(v_ptr + b * sv_b + h * sv_h, offs_n, sv_l, offs_d, kv_mask)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sdo_b + h * sdo_h
        stats = bh.to(tl.int64) * Lq
        for start in range(0, Lq, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = _tile(q_base, offs_m, sq_l, offs_d, q_mask)
            do = _tile(do_base, offs_m, sdo_l, offs_d, q_mask)
            lse2 = tl.load(lse_ptr + stats + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + stats + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * scale
        tl.store(dk_ptr + b * sdk_b + h * sdk_h + keys * sdk_l + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=kv_mask)
        tl.store(dv_ptr + b * sdv_b + h * sdv_h + keys * sdv_l + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=kv_mask)

    @triton.jit
    def _bwd_dq_segment(dq, q, do, lse2, delta, k_ptr, v_ptr, length, stride_kl, stride_vl, offs_d, d_ok, qk_scale,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        for start in range(0, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < length
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _tile(k_ptr, n, stride_kl, offs_d, kv_mask)
            v = _tile(v_ptr, n, stride_vl, offs_d, kv_mask)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.autotune(
        configs=triton_utils.autotune_configs(
            [
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
                triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
            ]
        ),
        key=["BLOCK_D", "PRECISION"],
    )
    @triton.jit
    def _bwd_dq_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        H, Lq, Lc, Ls, D, qk_scale, scale,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l, sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dQ of a tile of queries, over both key segments."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        d_ok = offs_d < D
        q_mask = m_ok[:, None] & d_ok[None, :]
        rows = offs_m[:, None].to(tl.int64)
        q = _tile(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l, offs_d, q_mask)
        do = _tile(do_ptr + b * sdo_b + h * sdo_h, offs_m, sdo_l, offs_d, q_mask)
        stats = bh.to(tl.int64) * Lq
        lse2 = tl.load(lse_ptr + stats + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + stats + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _bwd_dq_segment(dq, q, do, lse2, delta, kc_ptr + b * skc_b + h * skc_h, vc_ptr + b * svc_b + h * svc_h,
                             Lc, skc_l, svc_l, offs_d, d_ok, qk_scale, BLOCK_N, PRECISION)
        dq = _bwd_dq_segment(dq, q, do, lse2, delta, ks_ptr + b * sks_b + h * sks_h, vs_ptr + b * svs_b + h * svs_h,
                             Ls, sks_l, svs_l, offs_d, d_ok, qk_scale, BLOCK_N, PRECISION)
        dq = dq * scale
        tl.store(dq_ptr + b * sdq_b + h * sdq_h + rows * sdq_l + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=q_mask)


def _triton_meta(q):
    """Padded head dim and dot precision: exact fp32 products for fp32 inputs (no TF32)."""
    return dict(BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _bhl_strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def asymmetric_attention_triton(q, k_ctx, v_ctx, k_self, v_self, scale):
    B, H, Lq, D = q.shape
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    _attention_fwd_kernel[grid](
        q, k_ctx, v_ctx, k_self, v_self, out, lse,
        H, Lq, k_ctx.shape[2], k_self.shape[2], D, scale * LOG2E,
        *_bhl_strides(q, k_ctx, v_ctx, k_self, v_self, out), **_triton_meta(q),
    )
    return out, lse


def asymmetric_attention_backward_triton(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale):
    B, H, Lq, D = q.shape
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k_ctx, v_ctx, k_self, v_self)]
    dq, dk_ctx, dv_ctx, dk_self, dv_self = grads
    if Lq == 0 or B * H * D == 0:
        return tuple(g.zero_() for g in grads)
    if grad_out.stride(-1) != 1:  # autograd may hand over an expanded gradient
        grad_out = grad_out.contiguous()
    meta = _triton_meta(q)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(Lq, 64), B * H)](
        out, grad_out, delta, H, Lq, D, *_bhl_strides(out, grad_out), BLOCK_M=64, BLOCK_D=meta["BLOCK_D"],
    )
    for k, v, dk, dv in ((k_ctx, v_ctx, dk_ctx, dv_ctx), (k_self, v_self, dk_self, dv_self)):
        Lk = k.shape[2]
        if Lk == 0:
            continue
        _bwd_dkdv_kernel[lambda m, Lk=Lk: (triton.cdiv(Lk, m["BLOCK_N"]), B * H)](
            q, k, v, grad_out, lse, delta, dk, dv, H, Lq, Lk, D, scale * LOG2E, scale,
            *_bhl_strides(q, k, v, grad_out, dk, dv), **meta,
        )
    _bwd_dq_kernel[lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H)](
        q, k_ctx, v_ctx, k_self, v_self, grad_out, lse, delta, dq,
        H, Lq, k_ctx.shape[2], k_self.shape[2], D, scale * LOG2E, scale,
        *_bhl_strides(q, k_ctx, v_ctx, k_self, v_self, grad_out, dq), **meta,
    )
    return tuple(grads)


def _kernel_why_not(*tensors, max_d, dtypes, what):
    """Limits shared by the Triton and CUDA attention kernels."""
    reasons = []
    q = tensors[0]
    if q.dtype not in dtypes:
        reasons.append(f"the {what} attention kernels take {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                       f"got {str(q.dtype).removeprefix('torch.')}")
    if q.shape[-1] > max_d:
        reasons.append(f"head dim {q.shape[-1]} is above the {what} kernels' {max_d}")
    for name, t in zip(("q", "k_ctx", "v_ctx", "k_self", "v_self"), tensors):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            reasons.append(f"{name} is not contiguous in its last dimension (strides {t.stride()})")
    return reasons


# CUDA (csrc/cuda/asymmetric_attention.cu): forward only, tensor-core (wmma) tiles for fp16 and bf16 on
# sm_80 and newer, a warp-per-row path for fp32 and older GPUs. Its backward is the Triton one.

CUDA_DTYPES = TRITON_DTYPES
CUDA_MAX_D = 128


def asymmetric_attention_cuda(q, k_ctx, v_ctx, k_self, v_self, scale):
    return torch.ops.enat.asymmetric_attention_cuda(q, k_ctx, v_ctx, k_self, v_self, scale)


def _cuda_forward_why_not(q, k_ctx, v_ctx, k_self, v_self, scale):
    return _kernel_why_not(q, k_ctx, v_ctx, k_self, v_self, max_d=CUDA_MAX_D, dtypes=CUDA_DTYPES, what="CUDA")


def _triton_forward_why_not(q, k_ctx, v_ctx, k_self, v_self, scale):
    return _kernel_why_not(q, k_ctx, v_ctx, k_self, v_self, max_d=TRITON_MAX_D, dtypes=TRITON_DTYPES, what="Triton")


def _triton_backward_why_not(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale):
    return _kernel_why_not(q, k_ctx, v_ctx, k_self, v_self, max_d=TRITON_MAX_D, dtypes=TRITON_DTYPES, what="Triton")


# Dispatch, registration, autograd.

# Order on CUDA tensors. The rule is to take the faster of the CUDA and Triton forwards per dtype and
# architecture, as benchmarks/bench_attention.py measures them (scripts/gpu_check.sh). No GPU
# measurement exists yet, so Triton, whose forward and backward every test run checks against the
# oracle, goes first; the CUDA forward serves when forced.
FORWARD_ORDER = ("triton", "cuda", "reference")

FORWARD = Dispatcher("asymmetric_attention", order=FORWARD_ORDER)
FORWARD.register("reference", asymmetric_attention_reference)
FORWARD.register("triton", asymmetric_attention_triton, _triton_forward_why_not)
FORWARD.register("cuda", asymmetric_attention_cuda, _cuda_forward_why_not)

BACKWARD = Dispatcher("asymmetric_attention_backward")
BACKWARD.register("reference", asymmetric_attention_backward_reference)
BACKWARD.register("triton", asymmetric_attention_backward_triton, _triton_backward_why_not)


def _forward_router(q, k_ctx, v_ctx, k_self, v_self, scale, backend):
    return FORWARD.run(backend, q.device, q, k_ctx, v_ctx, k_self, v_self, scale)


def _backward_router(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, backend):
    return BACKWARD.run(backend, q.device, grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale)


register_router("asymmetric_attention", _forward_router)
register_router("asymmetric_attention_backward", _backward_router)


@torch.library.register_fake("enat::asymmetric_attention")
def _forward_fake(q, k_ctx, v_ctx, k_self, v_self, scale, backend=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=_accumulator_dtype(q.dtype)
    )


register_cuda_fake("asymmetric_attention_cuda", _forward_fake)


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


# FLOP formulas for torch.utils.flop_counter.FlopCounterMode (2 FLOPs a multiply-accumulate): the
# forward is two matmuls over Lc + Ls keys, the backward four (dV, dP, dQ, dK), as for SDPA.


def _attention_flops(q_shape, k_ctx_shape, k_self_shape, matmuls):
    B, H, Lq, D = q_shape
    return 2 * matmuls * B * H * Lq * (k_ctx_shape[2] + k_self_shape[2]) * D


@register_flop_formula(torch.ops.enat.asymmetric_attention)
def _forward_flops(q, k_ctx, v_ctx, k_self, v_self, *args, out_shape=None, **kwargs):
    return _attention_flops(q, k_ctx, k_self, 2)


@register_flop_formula(torch.ops.enat.asymmetric_attention_backward)
def _backward_flops(grad_out, q, k_ctx, v_ctx, k_self, v_self, *args, out_shape=None, **kwargs):
    return _attention_flops(q, k_ctx, k_self, 4)


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
