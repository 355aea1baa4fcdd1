"""asymmetric_attention: queries over two key/value segments, [context ; self], with one softmax.

    out = softmax(q @ [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self]

q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D); k_self, v_self (B, H, Ls, D). In ENAT this is the
decoder's attention ([MASK] queries over [visible ; [MASK]] keys) and the reuse encoder's attention
(new tokens over [cached ; new] keys). The two segments are never concatenated: each contributes its
scores to one log-sum-exp and its values to one output.
"""

import math
import numbers
import os

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import triton_utils
from .. import _library
from .._library import define, register_cuda_fake
from ..backends import CACHE_LIMIT, ENV_BACKEND, Dispatcher, signature
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


# Triton. Every kernel walks the joined key range [0, Lc + Ls) ("virtual concatenation"): row n of a
# K/V tile comes from the context segment when n < Lc and from the self segment at row n - Lc
# otherwise, each through its own strides, so one tile may straddle the boundary while the segments
# are never joined in memory. Full tiles load without row masks; only the last, partial tile is
# masked. The head dim is padded to a power of two >= 16 (masked columns unless D is one). Offsets of
# batch, head and row are 64-bit; accumulation is fp32.
# Forward: one online softmax in the log2 domain, the scores scaled and shifted by one multiply-add
# s * (scale log2 e) - m. Backward: one launch, no atomics (deterministic). For Lq <= SMALL_LQ one
# program per (batch, head) holds every query with its delta = rowsum(dO * O) and dQ, and finishes
# dK/dV of each key tile as it passes; longer query ranges run one program per tile index j that
# computes dK/dV of key tile j (delta recomputed per query tile from O and dO) and dQ of query tile j.
# Autotuning is keyed on the dtype, the head dim and the power-of-two buckets of Lq and Lc + Ls.

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_D = 128
SMALL_LQ = 128
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if triton is not None:

    @triton.jit
    def _batch_head(bh, H):
        return (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _rows(base, rows, stride_l):
        """[len(rows), 1] pointers to the first element of each row of one (batch, head)'s (L, D) matrix."""
        return base + rows[:, None].to(tl.int64) * stride_l

    @triton.jit
    def _joined_rows(ctx_base, ctx_stride, self_base, self_stride, n, Lc):
        """Row pointers of rows n of the joined [context ; self] range."""
        n64 = n[:, None].to(tl.int64)
        return tl.where(n64 < Lc, ctx_base + n64 * ctx_stride, self_base + (n64 - Lc) * self_stride)

    @triton.jit
    def _load(row_ptrs, offs_d, row_ok, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
        """A [rows, BLOCK_D] tile, zero where a row or column is out of range; unmasked when neither can be."""
        if MASK_ROWS:
            if EVEN_D:
                return tl.load(row_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            return tl.load(row_ptrs + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if EVEN_D:
            return tl.load(row_ptrs + offs_d[None, :])
        return tl.load(row_ptrs + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)

    @triton.jit
    def _store(row_ptrs, offs_d, row_ok, D, value, EVEN_D: tl.constexpr):
        if EVEN_D:
            tl.store(row_ptrs + offs_d[None, :], value.to(row_ptrs.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(row_ptrs + offs_d[None, :], value.to(row_ptrs.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_d[None, :] < D))

    @triton.jit
    def _fwd_tile(acc, m_i, l_i, q, kc, vc, ks, vs, skc_l, svc_l, sks_l, svs_l, start, Lc, Lk, D, qk_scale,
                  offs_d, BLOCK_N: tl.constexpr, LAST: tl.constexpr, EVEN_D: tl.constexpr,
                  NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr):
        """Fold keys [start, start + BLOCK_N) of the joined range into (acc, row max m_i, row sum l_i)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < Lk
        k = _load(_joined_rows(kc, skc_l, ks, sks_l, n, Lc), offs_d, n_ok, D, LAST, EVEN_D)
        v = _load(_joined_rows(vc, svc_l, vs, svs_l, n, Lc), offs_d, n_ok, D, LAST, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if LAST:
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        else:
            # The row maximum of s * qk_scale from the raw scores (the minimum for a negative scale), so
            # that the scaling and the shift are one multiply-add per score.
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    def _prune_by_lq(configs, named_args, **kwargs):
        """Drop query tiles larger than the query range needs (keep the smallest if none fit)."""
        fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["LQ_KEY"])]
        return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    def _prune_by_lk(configs, named_args, **kwargs):
        """Drop key tiles larger than the key range needs (keep the smallest if none fit)."""
        fit = [c for c in configs if c.kwargs["BLOCK_N"] <= max(16, named_args["LK_KEY"])]
        return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]

    # Hopper and Ampere: 64- and 128-row query tiles as in FlashAttention-2 and Triton's fused-attention
    # tutorial, smaller ones for the short query ranges of the reuse encoder.
    FORWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]

    @triton.autotune(configs=triton_utils.autotune_configs(FORWARD_CONFIGS),
                     key=["LQ_KEY", "LK_KEY", "BLOCK_D", "EVEN_D", "PRECISION"],
                     prune_configs_by={"early_config_prune": _prune_by_lq})
    @triton.jit
    def _attention_fwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, lse_ptr,
        H, Lq, Lc, Ls, D, qk_scale, LQ_KEY, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l, so_b, so_h, so_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        q = _load(_rows(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l), offs_d, m_ok, D, True, EVEN_D)
        kc = kc_ptr + b * skc_b + h * skc_h
        vc = vc_ptr + b * svc_b + h * svc_h
        ks = ks_ptr + b * sks_b + h * sks_h
        vs = vs_ptr + b * svs_b + h * svs_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        Lk = Lc + Ls
        full = Lk - Lk % BLOCK_N
        for start in range(0, full, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kc, vc, ks, vs, skc_l, svc_l, sks_l, svs_l, start, Lc, Lk, D,
                                      qk_scale, offs_d, BLOCK_N, False, EVEN_D, NEG_SCALE, PRECISION)
        if full < Lk:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kc, vc, ks, vs, skc_l, svc_l, sks_l, svs_l, full, Lc, Lk, D,
                                      qk_scale, offs_d, BLOCK_N, True, EVEN_D, NEG_SCALE, PRECISION)
        out = acc * (1.0 / l_i)[:, None]
        _store(_rows(out_ptr + b * so_b + h * so_h, offs_m, so_l), offs_d, m_ok, D, out, EVEN_D)
        tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def _bwd_key_tile(q, do, lse2, delta, kc, vc, ks, vs, dkc, dvc, dks, dvs,
                      skc_l, svc_l, sks_l, svs_l, sdkc_l, sdvc_l, sdks_l, sdvs_l, start, Lc, Lk, D, qk_scale, scale,
                      offs_d, BLOCK_N: tl.constexpr, LAST: tl.constexpr, EVEN_D: tl.constexpr,
                      PRECISION: tl.constexpr):
        """Key tile [start, start + BLOCK_N) against every query (held in registers): stores its dK
        and dV and returns its dS @ K share of dQ (unscaled)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < Lk
        k = _load(_joined_rows(kc, skc_l, ks, sks_l, n, Lc), offs_d, n_ok, D, LAST, EVEN_D)
        v = _load(_joined_rows(vc, svc_l, vs, svs_l, n, Lc), offs_d, n_ok, D, LAST, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # Query rows past Lq hold q = dO = delta = 0 and contribute nothing; key columns past Lk (last
        # tile only) are zeroed, since exp2(-lse2) may overflow there.
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if LAST:
            p = tl.where(n_ok[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION) * scale
        _store(_joined_rows(dkc, sdkc_l, dks, sdks_l, n, Lc), offs_d, n_ok, D, dk, EVEN_D)
        _store(_joined_rows(dvc, sdvc_l, dvs, sdvs_l, n, Lc), offs_d, n_ok, D, dv, EVEN_D)
        return tl.dot(ds, k, input_precision=PRECISION)

    # The query tile of the one-tile backward is Lq rounded up to a power of two (set by the launcher).
    BACKWARD_SHORT_CONFIGS = [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
    ]

    @triton.autotune(
        configs=triton_utils.autotune_configs(BACKWARD_SHORT_CONFIGS),
        key=["LK_KEY", "BLOCK_M", "BLOCK_D", "EVEN_D", "PRECISION"],
        prune_configs_by={"early_config_prune": _prune_by_lk},
    )
    @triton.jit
    def _attention_bwd_short_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, do_ptr, lse_ptr,
        dq_ptr, dkc_ptr, dvc_ptr, dks_ptr, dvs_ptr,
        H, Lq, Lc, Ls, D, qk_scale, scale, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l, sks_b, sks_h, sks_l, svs_b, svs_h, svs_l,
        so_b, so_h, so_l, sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l, sdkc_b, sdkc_h, sdkc_l,
        sdvc_b, sdvc_h, sdvc_l, sdks_b, sdks_h, sdks_l, sdvs_b, sdvs_h, sdvs_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """All gradients of one (batch, head) whose Lq <= BLOCK_M queries fit in one tile."""
        bh = tl.program_id(0)
        b, h = _batch_head(bh, H)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        q = _load(_rows(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l), offs_d, m_ok, D, True, EVEN_D)
        do = _load(_rows(do_ptr + b * sdo_b + h * sdo_h, offs_m, sdo_l), offs_d, m_ok, D, True, EVEN_D)
        o = _load(_rows(out_ptr + b * so_b + h * so_h, offs_m, so_l), offs_d, m_ok, D, True, EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse2 = tl.load(lse_ptr + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        kc = kc_ptr + b * skc_b + h * skc_h
        vc = vc_ptr + b * svc_b + h * svc_h
        ks = ks_ptr + b * sks_b + h * sks_h
        vs = vs_ptr + b * svs_b + h * svs_h
        dkc = dkc_ptr + b * sdkc_b + h * sdkc_h
        dvc = dvc_ptr + b * sdvc_b + h * sdvc_h
        dks = dks_ptr + b * sdks_b + h * sdks_h
        dvs = dvs_ptr + b * sdvs_b + h * sdvs_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        Lk = Lc + Ls
        full = Lk - Lk % BLOCK_N
        for start in range(0, full, BLOCK_N):
            dq += _bwd_key_tile(q, do, lse2, delta, kc, vc, ks, vs, dkc, dvc, dks, dvs,
                                skc_l, svc_l, sks_l, svs_l, sdkc_l, sdvc_l, sdks_l, sdvs_l, start, Lc, Lk, D,
                                qk_scale, scale, offs_d, BLOCK_N, False, EVEN_D, PRECISION)
        if full < Lk:
            dq += _bwd_key_tile(q, do, lse2, delta, kc, vc, ks, vs, dkc, dvc, dks, dvs,
                                skc_l, svc_l, sks_l, svs_l, sdkc_l, sdvc_l, sdks_l, sdvs_l, full, Lc, Lk, D,
                                qk_scale, scale, offs_d, BLOCK_N, True, EVEN_D, PRECISION)
        _store(_rows(dq_ptr + b * sdq_b + h * sdq_h, offs_m, sdq_l), offs_d, m_ok, D, dq * scale, EVEN_D)

    @triton.jit
    def _bwd_query_tile(q_base, do_base, o_base, lse_row, sq_l, sdo_l, so_l, offs_m, offs_d, Lq, D,
                        EVEN_D: tl.constexpr):
        """q, dO, log2-domain lse and delta = rowsum(dO * O) of the query rows offs_m."""
        m_ok = offs_m < Lq
        q = _load(_rows(q_base, offs_m, sq_l), offs_d, m_ok, D, True, EVEN_D)
        do = _load(_rows(do_base, offs_m, sdo_l), offs_d, m_ok, D, True, EVEN_D)
        o = _load(_rows(o_base, offs_m, so_l), offs_d, m_ok, D, True, EVEN_D)
        lse2 = tl.load(lse_row + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        return q, do, lse2, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), m_ok

    BACKWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    ]

    @triton.autotune(
        configs=triton_utils.autotune_configs(BACKWARD_CONFIGS),
        key=["LQ_KEY", "LK_KEY", "BLOCK_D", "EVEN_D", "PRECISION"],
    )
    @triton.jit
    def _attention_bwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, do_ptr, lse_ptr,
        dq_ptr, dkc_ptr, dvc_ptr, dks_ptr, dvs_ptr,
        H, Lq, Lc, Ls, D, qk_scale, scale, LQ_KEY, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l, sks_b, sks_h, sks_l, svs_b, svs_h, svs_l,
        so_b, so_h, so_l, sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l, sdkc_b, sdkc_h, sdkc_l,
        sdvc_b, sdvc_h, sdvc_l, sdks_b, sdks_h, sdks_l, sdvs_b, sdvs_h, sdvs_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Program (j, bh): dK and dV of key tile j over every query tile, and dQ of query tile j
        over every key tile (either part is skipped when tile j is past its range)."""
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_d = tl.arange(0, BLOCK_D)
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sdo_b + h * sdo_h
        o_base = out_ptr + b * so_b + h * so_h
        lse_row = lse_ptr + bh.to(tl.int64) * Lq
        kc = kc_ptr + b * skc_b + h * skc_h
        vc = vc_ptr + b * svc_b + h * svc_h
        ks = ks_ptr + b * sks_b + h * sks_h
        vs = vs_ptr + b * svs_b + h * svs_h
        Lk = Lc + Ls
        if j * BLOCK_N < Lk:
            n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < Lk
            k = _load(_joined_rows(kc, skc_l, ks, sks_l, n, Lc), offs_d, n_ok, D, True, EVEN_D)
            v = _load(_joined_rows(vc, svc_l, vs, svs_l, n, Lc), offs_d, n_ok, D, True, EVEN_D)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for start in range(0, Lq, BLOCK_M):
                q, do, lse2, delta, m_ok = _bwd_query_tile(q_base, do_base, o_base, lse_row, sq_l, sdo_l, so_l,
                                                           start + tl.arange(0, BLOCK_M), offs_d, Lq, D, EVEN_D)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = (p * (dp - delta[:, None])).to(q.dtype)
                dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
            dkc = dkc_ptr + b * sdkc_b + h * sdkc_h
            dvc = dvc_ptr + b * sdvc_b + h * sdvc_h
            dks = dks_ptr + b * sdks_b + h * sdks_h
            dvs = dvs_ptr + b * sdvs_b + h * sdvs_h
            _store(_joined_rows(dkc, sdkc_l, dks, sdks_l, n, Lc), offs_d, n_ok, D, dk * scale, EVEN_D)
            _store(_joined_rows(dvc, sdvc_l, dvs, sdvs_l, n, Lc), offs_d, n_ok, D, dv, EVEN_D)
        if j * BLOCK_M < Lq:
            offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
            q, do, lse2, delta, m_ok = _bwd_query_tile(q_base, do_base, o_base, lse_row, sq_l, sdo_l, so_l,
                                                       offs_m, offs_d, Lq, D, EVEN_D)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start in range(0, Lk, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                n_ok = n < Lk
                k = _load(_joined_rows(kc, skc_l, ks, sks_l, n, Lc), offs_d, n_ok, D, True, EVEN_D)
                v = _load(_joined_rows(vc, svc_l, vs, svs_l, n, Lc), offs_d, n_ok, D, True, EVEN_D)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                p = tl.where(n_ok[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = (p * (dp - delta[:, None])).to(k.dtype)
                dq += tl.dot(ds, k, input_precision=PRECISION)
            _store(_rows(dq_ptr + b * sdq_b + h * sdq_h, offs_m, sdq_l), offs_d, m_ok, D, dq * scale, EVEN_D)


def _bucket(n):
    """Power-of-two bucket of a sequence length, for autotuning keys (1024 and up share one)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1024)


def _triton_meta(q):
    """Padded head dim and dot precision: exact fp32 products for fp32 inputs (no TF32)."""
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    return dict(BLOCK_D=block_d, EVEN_D=block_d == D, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _bhl_strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def asymmetric_attention_triton(q, k_ctx, v_ctx, k_self, v_self, scale, *, config=None):
    """Forward on the Triton kernel; `config` (a triton.Config) bypasses autotuning (tests use it to run
    every configuration)."""
    B, H, Lq, D = q.shape
    Lc, Ls = k_ctx.shape[2], k_self.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    buckets = _bucket(Lq), _bucket(Lc + Ls)
    args = (q, k_ctx, v_ctx, k_self, v_self, out, lse, H, Lq, Lc, Ls, D, scale * LOG2E, *buckets,
            *_bhl_strides(q, k_ctx, v_ctx, k_self, v_self, out))
    meta = dict(_triton_meta(q), NEG_SCALE=scale < 0)
    triton_utils.launch(_attention_fwd_kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H), args, meta,
                        config, (q.dtype, *buckets, *meta.values()))
    return out, lse


def asymmetric_attention_backward_triton(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, *,
                                         config=None, short=None):
    """Gradients on the Triton kernels: the one-tile kernel when Lq <= SMALL_LQ, the tiled one otherwise
    (`short` forces either, `config` bypasses autotuning; tests use both)."""
    B, H, Lq, D = q.shape
    Lc, Ls = k_ctx.shape[2], k_self.shape[2]
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k_ctx, v_ctx, k_self, v_self)]
    if Lq == 0 or B * H * D == 0:
        return tuple(g.zero_() for g in grads)
    if grad_out.stride(-1) != 1:  # autograd may hand over an expanded gradient
        grad_out = grad_out.contiguous()
    args = (q, k_ctx, v_ctx, k_self, v_self, out, grad_out, lse, *grads, H, Lq, Lc, Ls, D, scale * LOG2E, scale)
    strides = _bhl_strides(q, k_ctx, v_ctx, k_self, v_self, out, grad_out, *grads)
    meta = _triton_meta(q)
    if short if short is not None else Lq <= SMALL_LQ:
        meta["BLOCK_M"] = max(16, triton.next_power_of_2(Lq))
        triton_utils.launch(_attention_bwd_short_kernel, lambda m: (B * H,), (*args, _bucket(Lc + Ls), *strides),
                            meta, config, (q.dtype, _bucket(Lc + Ls), *meta.values()))
    else:
        triton_utils.launch(_attention_bwd_kernel,
                            lambda m: (max(triton.cdiv(Lc + Ls, m["BLOCK_N"]), triton.cdiv(Lq, m["BLOCK_M"])), B * H),
                            (*args, _bucket(Lq), _bucket(Lc + Ls), *strides), meta, config,
                            (q.dtype, _bucket(Lq), _bucket(Lc + Ls), *meta.values()))
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


def _forward_fake(q, k_ctx, v_ctx, k_self, v_self, scale, backend=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=_accumulator_dtype(q.dtype)
    )


def _backward_fake(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k_ctx, v_ctx, k_self, v_self))


define("asymmetric_attention(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_self, Tensor v_self, float scale, "
       "str backend) -> (Tensor, Tensor)", _forward_router, _forward_fake)
define("asymmetric_attention_backward(Tensor grad_out, Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_self, "
       "Tensor v_self, Tensor out, Tensor lse, float scale, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
       _backward_router, _backward_fake)
register_cuda_fake("asymmetric_attention_cuda", _forward_fake)


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
    # Validation and backend choice depend only on the signature of the call: a call like an earlier
    # valid one reuses its plan.
    key = signature(q, k_ctx, v_ctx, k_self, v_self, scale, backend, os.environ.get(ENV_BACKEND),
                    _library.EXTENSION_LOADED, triton_utils.INTERPRET)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _plan(q, k_ctx, v_ctx, k_self, v_self, scale, backend)
        if key is not None:
            if len(_PLANS) >= CACHE_LIMIT:
                _PLANS.clear()
            _PLANS[key] = plan
    chosen, scale = plan
    out, lse = torch.ops.enat.asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self, scale, chosen)
    return (out, lse) if return_lse else out


_PLANS = {}  # signature of a valid call -> (backend, scale)


def _plan(q, k_ctx, v_ctx, k_self, v_self, scale, backend):
    """Check the arguments (errors name them) and pick the backend: (backend, scale as a float)."""
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
    scale = float(scale)
    return FORWARD.select(backend, q.device, q, k_ctx, v_ctx, k_self, v_self, scale), scale
