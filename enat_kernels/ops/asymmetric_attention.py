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

from .. import _library, triton_utils
from .._library import define, register_cuda_fake
from ..backends import Dispatcher, Entry
from . import _checks

triton, tl = triton_utils.triton, triton_utils.tl

def _accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_out(q):
    """The output (B, H, Lq, D) of every backend (and of the fake kernel), laid out (B, Lq, H, D):
    out.transpose(1, 2) is contiguous, so the model's merge of the heads,
    out.transpose(1, 2).reshape(B, Lq, H * D), is a view."""
    B, H, Lq, D = q.shape
    return q.new_empty((B, Lq, H, D)).transpose(1, 2)


# Reference (plain PyTorch, fp32 accumulation; fp64 for fp64 inputs).


def _segment_scores(q, keys, scale):
    """[q @ k^T * scale for each key segment], in the accumulator dtype."""
    acc = _accumulator_dtype(q.dtype)
    qa = q.to(acc)
    return [torch.matmul(qa, k.to(acc).transpose(-1, -2)) * scale for k in keys]


# PyTorch's fused CPU attention returns each segment's output and log-sum-exp without materialising
# the scores; an empty query set takes the general path (that kernel divides by zero on it). Called
# as a torch function (not through torch.ops.aten) for its lower host cost.
_CPU_FUSED = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_fused_attention(q, segments, scale):
    """Per-segment fused attention, combined by log-sum-exp: with l = logaddexp(l_ctx, l_self),
    out = o_self + exp(l_ctx - l) (o_ctx - o_self)."""
    parts = [_CPU_FUSED(q, k, v, scale=scale) for k, v in segments]
    lse = q.new_empty(q.shape[:3])
    if len(parts) == 1:
        out = parts[0][0]  # laid out as q: when q is the model's view, already as _new_out lays it out
        return (out if out.transpose(1, 2).is_contiguous() else _new_out(q).copy_(out)), lse.copy_(parts[0][1])
    out = _new_out(q)
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
    return _new_out(q).copy_(numerator.div_(denominator)), lse


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


# Triton. The two key segments are walked one after the other, each from its own base pointer with its
# own strides: context tiles [0, Lc), then self tiles [0, Ls). Every tile comes from one segment, so its
# rows are one strided range that Triton vectorises and pipelines (cp.async on sm_80, cp.async or TMA
# on sm_90) whenever the strides allow; full tiles load without row masks and each segment ends in at
# most one masked tile. The head dim is padded to a power of two >= 16 on chip (masked columns unless D
# is one: ENAT-S's 61 runs as 64). Offsets of batch, head and row are 64-bit; accumulation is fp32;
# fp16 and bf16 products run on tensor cores (wgmma on sm_90, mma.sync on sm_80), fp32 ones are exact
# ("ieee": FMA, no TF32).
#
# Forward: one program per (query tile, batch * head); one online softmax over both segments in the log2
# domain, the scores scaled and shifted by one multiply-add s * (scale log2 e) - m.
#
# Backward: a preprocessing kernel writes delta = rowsum(dO * O) (fp32, (B, H, Lq)); then one program
# per (batch, head) owns every gradient of that head, so nothing needs atomics and every run gives the
# same bits. The program walks the key tiles (context, then self) and for each walks the query tiles,
# computing per (key tile, query tile) the five products of FlashAttention-2 in the key-major
# (transposed) form, whose M dimension is the key tile or the head dim (>= 64 for wgmma whatever the
# query tile):
#     S^T = K Q^T,  dV += P^T dO,  dP^T = V dO^T,  dK += dS^T Q,  dQ^T += K^T dS^T.
# dK and dV of the key tile stay in registers and are stored once. dQ of a query tile gathers over the
# key tiles of the program: when every query fits one tile (Lq <= SMALL_LQ, the "one-tile" kernel,
# which computes delta itself from the O and dO it holds) it stays in registers; otherwise it is read,
# added to and written back in an fp32 scratch of (B, H, Lq, D) between key tiles (the first key tile
# writes without reading, the last one writes dQ in its dtype; a barrier per key tile orders the
# program's own writes and reads). This is FlashAttention-2's algorithm and memory traffic with the
# atomic dQ adds replaced by owned read-modify-writes; its cost is parallelism: B * H programs (2048
# for ENAT-L training, B = 128, H = 16), so small B * H leave SMs idle. The alternative without atomics,
# a dK/dV kernel over key tiles plus a dQ kernel over query tiles (Triton's fused-attention tutorial),
# has B * H * tiles programs but 7 products per tile pair instead of 5.
# Autotuning is keyed on the head dim, the precision and the power-of-two buckets of Lq and Lc + Ls; the
# configs are those that compile without spills and within shared memory on sm_80 and sm_90
# (tests/test_gpu_targets.py), per target (`target_configs`).

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
    def _fwd_tile(acc, m_i, l_i, q, k, v, n_ok, qk_scale, LAST: tl.constexpr, NEG_SCALE: tl.constexpr,
                  PRECISION: tl.constexpr):
        """Fold a key tile (k, v; n_ok: its rows in range, read when LAST) into (acc, row max m_i, row sum l_i)."""
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

    @triton.jit
    def _fwd_segment(acc, m_i, l_i, q, k_base, v_base, sk_l, sv_l, L, D, qk_scale, offs_d,
                     BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREFETCH: tl.constexpr, NEG_SCALE: tl.constexpr,
                     PRECISION: tl.constexpr):
        """Fold the L keys of one segment: full tiles unmasked, then the partial one. Triton pipelines the
        full tiles' loads (cp.async, TMA) when the rows allow 4-byte or wider copies; rows that do not
        (PREFETCH: ENAT-S's head dim 61 in the model's layout starts rows at 2-byte boundaries) are
        pipelined here instead, each tile loaded into registers while the previous one is used."""
        full = L - L % BLOCK_N
        n = tl.arange(0, BLOCK_N)
        if PREFETCH:
            k_next = _load(_rows(k_base, n, sk_l), offs_d, n < full, D, True, EVEN_D)
            v_next = _load(_rows(v_base, n, sv_l), offs_d, n < full, D, True, EVEN_D)
            for start in range(0, full, BLOCK_N):
                k = k_next
                v = v_next
                following = start + BLOCK_N + n
                k_next = _load(_rows(k_base, following, sk_l), offs_d, following < full, D, True, EVEN_D)
                v_next = _load(_rows(v_base, following, sv_l), offs_d, following < full, D, True, EVEN_D)
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, n, qk_scale, False, NEG_SCALE, PRECISION)
        else:
            for start in range(0, full, BLOCK_N):
                k = _load(_rows(k_base, start + n, sk_l), offs_d, n, D, False, EVEN_D)
                v = _load(_rows(v_base, start + n, sv_l), offs_d, n, D, False, EVEN_D)
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, n, qk_scale, False, NEG_SCALE, PRECISION)
        if full < L:
            n_ok = full + n < L
            k = _load(_rows(k_base, full + n, sk_l), offs_d, n_ok, D, True, EVEN_D)
            v = _load(_rows(v_base, full + n, sv_l), offs_d, n_ok, D, True, EVEN_D)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, n_ok, qk_scale, True, NEG_SCALE, PRECISION)
        return acc, m_i, l_i

    def _prune_by_lq(configs, named_args, **kwargs):
        """Drop query tiles larger than the query range needs (keep the smallest if none fit)."""
        fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["LQ_KEY"])]
        return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    def _prune_by_lk(configs, named_args, **kwargs):
        """Drop key tiles larger than the key range needs (keep the smallest if none fit)."""
        fit = [c for c in configs if c.kwargs["BLOCK_N"] <= max(16, named_args["LK_KEY"])]
        return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]

    FORWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]

    @triton.autotune(configs=triton_utils.autotune_configs(FORWARD_CONFIGS),
                     key=["LQ_KEY", "LK_KEY", "BLOCK_D", "EVEN_D", "PREFETCH", "PRECISION"],
                     prune_configs_by={"early_config_prune": _prune_by_lq})
    @triton.jit
    def _attention_fwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, lse_ptr,
        H, Lq, Lc, Ls, D, qk_scale, LQ_KEY, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l, so_b, so_h, so_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        PREFETCH: tl.constexpr, NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        q = _load(_rows(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l), offs_d, m_ok, D, True, EVEN_D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, kc_ptr + b * skc_b + h * skc_h, vc_ptr + b * svc_b + h * svc_h,
                                     skc_l, svc_l, Lc, D, qk_scale, offs_d, BLOCK_N, EVEN_D, PREFETCH, NEG_SCALE,
                                     PRECISION)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, ks_ptr + b * sks_b + h * sks_h, vs_ptr + b * svs_b + h * svs_h,
                                     sks_l, svs_l, Ls, D, qk_scale, offs_d, BLOCK_N, EVEN_D, PREFETCH, NEG_SCALE,
                                     PRECISION)
        out = acc * (1.0 / l_i)[:, None]
        _store(_rows(out_ptr + b * so_b + h * so_h, offs_m, so_l), offs_d, m_ok, D, out, EVEN_D)
        tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def _attention_bwd_delta_kernel(out_ptr, do_ptr, delta_ptr, H, Lq, D, so_b, so_h, so_l, sdo_b, sdo_h, sdo_l,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
        """delta = rowsum(dO * O) of BLOCK_M query rows of one (batch, head), fp32."""
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        o = _load(_rows(out_ptr + b * so_b + h * so_h, offs_m, so_l), offs_d, m_ok, D, True, EVEN_D)
        do = _load(_rows(do_ptr + b * sdo_b + h * sdo_h, offs_m, sdo_l), offs_d, m_ok, D, True, EVEN_D)
        tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_ok)

    @triton.jit
    def _bwd_query_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, dq_base, dqs_base, sq_l, sdo_l, sdq_l,
                        sdqs_l, start, first, last, n_ok, Lq, D, qk_scale, scale, offs_d, BLOCK_M: tl.constexpr,
                        KEY_MASK: tl.constexpr, QUERY_MASK: tl.constexpr, EVEN_D: tl.constexpr, DV: tl.constexpr,
                        DK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr):
        """Query tile [start, start + BLOCK_M) against a key tile (k, v): adds its shares to dV (DV), dK (DK)
        and to dQ (DQ: in the fp32 scratch, or dQ itself at the last key tile). Query rows past Lq hold
        q = dO = lse = delta = 0 and contribute nothing; key rows past the segment (KEY_MASK) get P = 0,
        since exp2(-lse2) may overflow there."""
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = _load(_rows(q_base, offs_m, sq_l), offs_d, m_ok, D, QUERY_MASK, EVEN_D)
        do = _load(_rows(do_base, offs_m, sdo_l), offs_d, m_ok, D, QUERY_MASK, EVEN_D)
        if QUERY_MASK:
            lse2 = tl.load(lse_row + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        else:
            lse2 = tl.load(lse_row + offs_m) * 1.4426950408889634
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])  # P^T
        if KEY_MASK:
            p_t = tl.where(n_ok[:, None], p_t, 0.0)
        if DV:
            dv = tl.dot(p_t.to(do.dtype), do, acc=dv, input_precision=PRECISION)
        if DK or DQ:
            if QUERY_MASK:
                delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)
            else:
                delta = tl.load(delta_row + offs_m)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # dS^T
            if DK:
                dk = tl.dot(ds_t, q, acc=dk, input_precision=PRECISION)
            if DQ:
                # dQ^T [BLOCK_D, BLOCK_M] += K^T dS^T: the scratch rows are query rows, so the tile is transposed.
                dqs = dqs_base + offs_m[None, :].to(tl.int64) * sdqs_l + offs_d[:, None]
                tile_ok = m_ok[None, :] & (offs_d[:, None] < D)
                dq_t = tl.load(dqs, mask=tile_ok & (first == 0), other=0.0)
                dq_t = tl.dot(tl.trans(k), ds_t, acc=dq_t, input_precision=PRECISION)
                tl.store(dqs, dq_t, mask=tile_ok & (last == 0))
                dq = dq_base + offs_m[None, :].to(tl.int64) * sdq_l + offs_d[:, None]
                tl.store(dq, (dq_t * scale).to(dq_base.dtype.element_ty), mask=tile_ok & (last != 0))
        return dk, dv

    @triton.jit
    def _bwd_key_tile(q_base, do_base, lse_row, delta_row, dq_base, dqs_base, k_base, v_base, dk_base, dv_base,
                      sq_l, sdo_l, sdq_l, sdqs_l, sk_l, sv_l, sdk_l, sdv_l, start, L, first, last, Lq, D,
                      qk_scale, scale, offs_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_MASK: tl.constexpr,
                      EVEN_D: tl.constexpr, DV: tl.constexpr, DK: tl.constexpr, DQ: tl.constexpr,
                      PRECISION: tl.constexpr):
        """Key tile [start, start + BLOCK_N) of one segment of L keys against every query tile (full tiles
        unmasked, then the partial one): stores its dV (DV) and dK (DK), adds its shares of dQ (DQ)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < L
        k = _load(_rows(k_base, n, sk_l), offs_d, n_ok, D, KEY_MASK, EVEN_D)
        v = k
        if DK or DQ:
            v = _load(_rows(v_base, n, sv_l), offs_d, n_ok, D, KEY_MASK, EVEN_D)
        dk = tl.zeros(k.shape, tl.float32)
        dv = tl.zeros(k.shape, tl.float32)
        if DQ:
            tl.debug_barrier()  # orders the previous key tile's dQ scratch writes before this one's reads
        full = Lq - Lq % BLOCK_M
        for m0 in range(0, full, BLOCK_M):
            dk, dv = _bwd_query_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, dq_base, dqs_base, sq_l,
                                     sdo_l, sdq_l, sdqs_l, m0, first, last, n_ok, Lq, D, qk_scale, scale, offs_d,
                                     BLOCK_M, KEY_MASK, False, EVEN_D, DV, DK, DQ, PRECISION)
        if full < Lq:
            dk, dv = _bwd_query_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, dq_base, dqs_base, sq_l,
                                     sdo_l, sdq_l, sdqs_l, full, first, last, n_ok, Lq, D, qk_scale, scale, offs_d,
                                     BLOCK_M, KEY_MASK, True, EVEN_D, DV, DK, DQ, PRECISION)
        if DV:
            _store(_rows(dv_base, n, sdv_l), offs_d, n_ok, D, dv, EVEN_D)
        if DK:
            _store(_rows(dk_base, n, sdk_l), offs_d, n_ok, D, dk * scale, EVEN_D)

    BACKWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=2, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=2, num_stages=1),
    ]

    @triton.autotune(
        configs=triton_utils.autotune_configs(BACKWARD_CONFIGS),
        key=["LQ_KEY", "LK_KEY", "BLOCK_D", "EVEN_D", "DV", "DK", "DQ", "PRECISION"],
    )
    @triton.jit
    def _attention_bwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr,
        dq_ptr, dqs_ptr, dkc_ptr, dvc_ptr, dks_ptr, dvs_ptr,
        H, Lq, Lc, Ls, D, qk_scale, scale, LQ_KEY, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l, sks_b, sks_h, sks_l, svs_b, svs_h, svs_l,
        sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l, sdqs_b, sdqs_h, sdqs_l, sdkc_b, sdkc_h, sdkc_l,
        sdvc_b, sdvc_h, sdvc_l, sdks_b, sdks_h, sdks_l, sdvs_b, sdvs_h, sdvs_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        DV: tl.constexpr, DK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """All gradients of one (batch, head): the key tiles of the context, then of the self segment (one
        loop, each segment from its own pointers), each against every query tile."""
        bh = tl.program_id(0)
        b, h = _batch_head(bh, H)
        offs_d = tl.arange(0, BLOCK_D)
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sdo_b + h * sdo_h
        lse_row = lse_ptr + bh.to(tl.int64) * Lq
        delta_row = delta_ptr + bh.to(tl.int64) * Lq
        dq_base = dq_ptr + b * sdq_b + h * sdq_h
        dqs_base = dqs_ptr + b * sdqs_b + h * sdqs_h
        for segment in range(2):
            ctx = segment == 0
            k_base = tl.where(ctx, kc_ptr + b * skc_b + h * skc_h, ks_ptr + b * sks_b + h * sks_h)
            v_base = tl.where(ctx, vc_ptr + b * svc_b + h * svc_h, vs_ptr + b * svs_b + h * svs_h)
            dk_base = tl.where(ctx, dkc_ptr + b * sdkc_b + h * sdkc_h, dks_ptr + b * sdks_b + h * sdks_h)
            dv_base = tl.where(ctx, dvc_ptr + b * sdvc_b + h * sdvc_h, dvs_ptr + b * sdvs_b + h * sdvs_h)
            sk_l = tl.where(ctx, skc_l, sks_l)
            sv_l = tl.where(ctx, svc_l, svs_l)
            sdk_l = tl.where(ctx, sdkc_l, sdks_l)
            sdv_l = tl.where(ctx, sdvc_l, sdvs_l)
            L = tl.where(ctx, Lc, Ls)
            first_segment = ctx | (Lc == 0)  # dQ: the first key tile writes the scratch without reading it,
            last_segment = (~ctx) | (Ls == 0)  # the last one writes dQ itself
            full = L - L % BLOCK_N
            for start in range(0, full, BLOCK_N):
                _bwd_key_tile(q_base, do_base, lse_row, delta_row, dq_base, dqs_base, k_base, v_base, dk_base,
                              dv_base, sq_l, sdo_l, sdq_l, sdqs_l, sk_l, sv_l, sdk_l, sdv_l, start, L,
                              (start == 0) & first_segment, (start + BLOCK_N >= L) & last_segment, Lq, D, qk_scale,
                              scale, offs_d, BLOCK_M, BLOCK_N, False, EVEN_D, DV, DK, DQ, PRECISION)
            if full < L:
                _bwd_key_tile(q_base, do_base, lse_row, delta_row, dq_base, dqs_base, k_base, v_base, dk_base,
                              dv_base, sq_l, sdo_l, sdq_l, sdqs_l, sk_l, sv_l, sdk_l, sdv_l, full, L,
                              (full == 0) & first_segment, last_segment, Lq, D, qk_scale, scale, offs_d, BLOCK_M,
                              BLOCK_N, True, EVEN_D, DV, DK, DQ, PRECISION)


def _bucket(n):
    """Power-of-two bucket of a sequence length, for autotuning keys (1024 and up share one)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1024)


def _triton_meta(q, min_block_d=16):
    """Padded head dim and dot precision: exact fp32 products for fp32 inputs (no TF32)."""
    D = q.shape[-1]
    block_d = max(min_block_d, triton.next_power_of_2(D))
    return dict(BLOCK_D=block_d, EVEN_D=block_d == D, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _rows_copy_aligned(*tensors):
    """Whether every row of every (B, H, L, D) tensor starts and ends on a 16-byte boundary, so that the
    compiler can copy K/V tiles asynchronously (else the forward prefetches them into registers)."""
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3])
               and t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _bhl_strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


DELTA_BLOCK_M = 64  # query rows per program of the delta kernel
# The backward's launches per target family and padded head dim, each with the gradients it accumulates:
# one pass of the five products, or one launch per gradient (S^T three times, dP^T twice: 8 products
# instead of 5) where the registers of two fp32 accumulators and the dQ tile do not fit without spills
# (tests/test_gpu_targets.py).
ONE_PASS = (("dV", "dK", "dQ"),)
PER_GRADIENT = (("dV",), ("dK",), ("dQ",))
BACKWARD_PASSES = {("sm90", 64): ONE_PASS, ("sm80", 64): ONE_PASS, ("sm90", 128): PER_GRADIENT,
                   ("sm80", 128): PER_GRADIENT}


def asymmetric_attention_triton(q, k_ctx, v_ctx, k_self, v_self, scale, *, config=None):
    """Forward on the Triton kernel; `config` (a triton.Config) bypasses autotuning (tests use it to run
    every configuration)."""
    B, H, Lq, D = q.shape
    Lc, Ls = k_ctx.shape[2], k_self.shape[2]
    out = _new_out(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    buckets = _bucket(Lq), _bucket(Lc + Ls)
    args = (q, k_ctx, v_ctx, k_self, v_self, out, lse, H, Lq, Lc, Ls, D, scale * LOG2E, *buckets,
            *_bhl_strides(q, k_ctx, v_ctx, k_self, v_self, out))
    meta = dict(_triton_meta(q), PREFETCH=not _rows_copy_aligned(k_ctx, v_ctx, k_self, v_self), NEG_SCALE=scale < 0)
    triton_utils.launch(_attention_fwd_kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H), args, meta,
                        config, (q.dtype, *buckets, *meta.values()))
    return out, lse


def asymmetric_attention_backward_triton(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, *,
                                         config=None, passes=None):
    """Gradients on the Triton kernels: delta = rowsum(dO * O), then per pass one program per (batch,
    head). `config` (a triton.Config) bypasses autotuning and `passes` (a value of BACKWARD_PASSES)
    overrides the target's passes; tests use both to run every configuration of every pass."""
    B, H, Lq, D = q.shape
    Lc, Ls = k_ctx.shape[2], k_self.shape[2]
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k_ctx, v_ctx, k_self, v_self)]
    if Lq == 0 or B * H * D == 0:
        return tuple(g.zero_() for g in grads)
    if grad_out.stride(-1) != 1:  # autograd may hand over an expanded gradient
        grad_out = grad_out.contiguous()
    # Head dims below 64 run padded to 64, so that dQ^T = K^T dS^T (M = the head dim) fills a wgmma.
    meta = _triton_meta(q, min_block_d=64)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(triton.cdiv(Lq, DELTA_BLOCK_M), B * H)](
        out, grad_out, delta, H, Lq, D, *_bhl_strides(out, grad_out), BLOCK_M=DELTA_BLOCK_M,
        BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"])
    dq = grads[0]
    scratch = dq if dq.dtype == torch.float32 else torch.empty(dq.shape, dtype=torch.float32, device=dq.device)
    buckets = _bucket(Lq), _bucket(Lc + Ls)
    args = (q, k_ctx, v_ctx, k_self, v_self, grad_out, lse, delta, dq, scratch, *grads[1:], H, Lq, Lc, Ls, D,
            scale * LOG2E, scale, *buckets,
            *_bhl_strides(q, k_ctx, v_ctx, k_self, v_self, grad_out, dq, scratch, *grads[1:]))
    if passes is None:
        passes = BACKWARD_PASSES[triton_utils.target_family(triton_utils.capability([q])), meta["BLOCK_D"]]
    for products in passes:
        pass_meta = dict(meta, DV="dV" in products, DK="dK" in products, DQ="dQ" in products)
        triton_utils.launch(_attention_bwd_kernel, lambda m: (B * H,), args, pass_meta, config,
                            (q.dtype, *buckets, *pass_meta.values()))
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


# CUDA (csrc/cuda/asymmetric_attention.cu, kernels in csrc/cuda/attention_kernels.cuh): forward only.
# fp16 and bf16 on sm_80 and newer (Hopper included) run FlashAttention-2 style tiles on mma.sync
# m16n8k16 with a cp.async pipeline whose 16-, 8- or 4-byte copies and column shifts take the model's
# strided views as they are (ENAT-S's head dim 61 included); fp32 and older GPUs a warp-per-row kernel.
# The output is (B, H, Lq, D) laid out (B, Lq, H, D), as _new_out makes it. Its backward is the Triton
# one. Resources per kernel and architecture: scripts/cuda_resources.py (docs/OPS.md).

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


# CPU (csrc/cpu/kernels.cpp): forward only, fp32 and fp64. One call runs every query row: its scores
# against both segments, in turn, then the softmax and the weighted sum of values. A scalar loop, so
# it is faster than the reference's two fused PyTorch calls and their merge only while host time
# dominates: up to CPU_MAX_WORK multiply-adds of q against the keys (B H Lq (Lc + Ls) D; measured
# on an x86 CPU, one thread: 15 us against 39 at 27K, 0.74 ms against 0.24 at 2.1M).

CPU_DTYPES = (torch.float32, torch.float64)
CPU_MAX_WORK = 1 << 16


def asymmetric_attention_cpu(q, k_ctx, v_ctx, k_self, v_self, scale):
    return _library.CPU.asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self, scale)


def _cpu_forward_why_not(q, k_ctx, v_ctx, k_self, v_self, scale):
    reasons = _kernel_why_not(q, k_ctx, v_ctx, k_self, v_self, max_d=math.inf, dtypes=CPU_DTYPES, what="CPU")
    B, H, Lq, D = q.shape
    work = B * H * Lq * (k_ctx.shape[2] + k_self.shape[2]) * D
    if work > CPU_MAX_WORK:
        reasons.append(f"B H Lq (Lc + Ls) D = {work} is above the CPU kernel's {CPU_MAX_WORK}, where PyTorch's fused "
                       "attention (the reference) is faster")
    return reasons


# Dispatch, registration, autograd.

FORWARD = Dispatcher("asymmetric_attention")
FORWARD.register("reference", asymmetric_attention_reference)
FORWARD.register("triton", asymmetric_attention_triton, _triton_forward_why_not)
FORWARD.register("cuda", asymmetric_attention_cuda, _cuda_forward_why_not)
FORWARD.register("cpu", asymmetric_attention_cpu, _cpu_forward_why_not)

BACKWARD = Dispatcher("asymmetric_attention_backward")
BACKWARD.register("reference", asymmetric_attention_backward_reference)
BACKWARD.register("triton", asymmetric_attention_backward_triton, _triton_backward_why_not)


def _forward_router(q, k_ctx, v_ctx, k_self, v_self, scale, backend):
    return FORWARD.run(backend, q.device, q, k_ctx, v_ctx, k_self, v_self, scale)


def _backward_router(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, backend):
    return BACKWARD.run(backend, q.device, grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale)


def _forward_fake(q, k_ctx, v_ctx, k_self, v_self, scale, backend=None):
    return _new_out(q), q.new_empty(
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
    out, lse = _ATTENTION(q, k_ctx, v_ctx, k_self, v_self, scale, backend=backend)
    return (out, lse) if return_lse else out


def _check(q, k_ctx, v_ctx, k_self, v_self, scale):
    """Check the arguments (errors name them); returns them with scale as a float."""
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
    return q, k_ctx, v_ctx, k_self, v_self, float(scale)


_ATTENTION = Entry(FORWARD, _check)
