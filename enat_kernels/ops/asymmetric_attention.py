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
from .. import checks as _checks

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
# rows are one strided range: full tiles load without row masks, each segment ends in at most one masked
# tile, and Triton vectorises and pipelines the loads (cp.async) wherever the rows are 16-byte aligned
# (ALIGNED). The head dim is padded on chip to a power of two (>= 16; >= 64 in the backward), its extra
# columns masked unless D is one. ENAT-S's 61 in the model's layout starts rows on 2-byte boundaries,
# which no asynchronous copy takes (cp.async copies 4, 8 or 16 aligned bytes; TMA needs 16-byte strides):
# its tiles are read element by element with one predicate per row (columns past D read column D - 1 and
# are zeroed in registers), and the forward prefetches them into registers one tile ahead. Offsets of
# batch, head and row are 64-bit; accumulation is fp32; fp16 and bf16 products run on tensor cores
# (wgmma on sm_90, mma.sync on sm_80), fp32 ones are exact ("ieee": FMA, no TF32).
#
# Forward: one program per (query tile, batch * head); one online softmax over both segments in the log2
# domain, the scores scaled and shifted by one multiply-add s * (scale log2 e) - m.
#
# Backward: a preprocessing kernel writes delta = rowsum(dO * O) (fp32, (B, H, Lq)); then one program
# per (batch, head) owns every gradient of that head, so nothing needs atomics and every run gives the
# same bits. The program walks the key tiles (context, then self) and, for each, the query tiles,
# computing FlashAttention-2's five products per (key tile, query tile) in the key-major (transposed)
# form, whose M dimension is the key tile or the head dim (>= 64, as wgmma needs, whatever the query
# tile; so head dims below 64 run padded to 64):
#     S^T = K Q^T,  dV += P^T dO,  dP^T = V dO^T,  dK += dS^T Q,  dQ^T += K^T dS^T.
# dK and dV of the key tile stay in registers and are stored once. dQ gathers over the key tiles in an
# fp32 scratch of (B, H, Lq, BLOCK_D) that the program reads, adds to and writes back (the first key
# tile writes without reading; a barrier per key tile orders the program's own writes and reads), and
# finally scales into dQ. This is FlashAttention-2's algorithm and memory traffic with its atomic dQ
# adds replaced by owned read-modify-writes. Its costs: parallelism, B * H programs (2048 for ENAT-L
# training, B = 128, H = 16; small B * H leave SMs idle); and registers. Where the two fp32
# accumulators, the dQ tile and the operands do not fit 255 registers without spilling (sm_80 at head
# dim 64; head dim 128; ENAT-S's unaligned rows), the products are split over launches of the same
# kernel, each of which walks every tile pair again (BACKWARD_PLANS): (dV, dK) then dQ computes S^T and
# dP^T twice, 7 products per tile pair like Triton's fused-attention tutorial; one launch per gradient
# computes S^T three times and dP^T twice, 8. The alternative without atomics, a dK/dV kernel over key
# tiles plus a dQ kernel over query tiles, has B * H * tiles programs but also 7 products.
#
# Configs are listed per target family (sm_80, sm_90), products (tensor cores or fp32 FMA), padded head
# dim and, in the backward, row alignment and launch; autotuning tries the launch's list, keyed on those
# and on the power-of-two buckets of Lq and Lc + Ls. tests/test_gpu_targets.py compiles every listed
# config for its target and fails on a spill, on more than 255 registers, on shared memory over the
# target's limit or on an fp16/bf16 product not on tensor cores. fp32 runs here up to head dim 32 only
# (TRITON_FP32_MAX_D).

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_D = 128
LOG2E = 1.4426950408889634
# The backward's launch plans, each launch with the gradients it accumulates (see above): one pass of the
# five products, (dV, dK) then dQ (7 products), or one per gradient (8). BACKWARD_PLANS picks per target.
ONE_PASS = (("dV", "dK", "dQ"),)
KV_THEN_Q = (("dV", "dK"), ("dQ",))
PER_GRADIENT = (("dV",), ("dK",), ("dQ",))

if triton is not None:

    @triton.jit
    def _batch_head(bh, H):
        return (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _rows(base, rows, stride_l):
        """[len(rows), 1] pointers to the first element of each row of one (batch, head)'s (L, D) matrix."""
        return base + rows[:, None].to(tl.int64) * stride_l

    @triton.jit
    def _load(row_ptrs, offs_d, row_ok, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr):
        """A [rows, BLOCK_D] tile, zero where a row or column is out of range; unmasked when neither can be.
        Unaligned rows with padded columns read column D - 1 in their place and zero it in registers, so
        that the element-wise loads need one predicate per row, not one per element."""
        if EVEN_D or ALIGNED:
            cols = offs_d
        else:
            cols = tl.minimum(offs_d, D - 1)
        ptrs = row_ptrs + cols[None, :]
        if EVEN_D or not ALIGNED:
            if MASK_ROWS:
                tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
            else:
                tile = tl.load(ptrs)
            if not EVEN_D:
                tile = tl.where(offs_d[None, :] < D, tile, 0.0)
            return tile
        if MASK_ROWS:
            return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)

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
                     BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, NEG_SCALE: tl.constexpr,
                     PRECISION: tl.constexpr):
        """Fold the L keys of one segment: full tiles unmasked, then the partial one. Unaligned rows, whose
        loads Triton cannot pipeline, are pipelined here: each tile is loaded into registers while the
        previous one is used."""
        full = L - L % BLOCK_N
        n = tl.arange(0, BLOCK_N)
        if ALIGNED:
            for start in range(0, full, BLOCK_N):
                k = _load(_rows(k_base, start + n, sk_l), offs_d, n, D, False, EVEN_D, ALIGNED)
                v = _load(_rows(v_base, start + n, sv_l), offs_d, n, D, False, EVEN_D, ALIGNED)
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, n, qk_scale, False, NEG_SCALE, PRECISION)
        else:
            k_next = _load(_rows(k_base, n, sk_l), offs_d, n < full, D, True, EVEN_D, ALIGNED)
            v_next = _load(_rows(v_base, n, sv_l), offs_d, n < full, D, True, EVEN_D, ALIGNED)
            for start in range(0, full, BLOCK_N):
                k = k_next
                v = v_next
                following = start + BLOCK_N + n
                k_next = _load(_rows(k_base, following, sk_l), offs_d, following < full, D, True, EVEN_D, ALIGNED)
                v_next = _load(_rows(v_base, following, sv_l), offs_d, following < full, D, True, EVEN_D, ALIGNED)
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, n, qk_scale, False, NEG_SCALE, PRECISION)
        if full < L:
            n_ok = full + n < L
            k = _load(_rows(k_base, full + n, sk_l), offs_d, n_ok, D, True, EVEN_D, ALIGNED)
            v = _load(_rows(v_base, full + n, sv_l), offs_d, n_ok, D, True, EVEN_D, ALIGNED)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k, v, n_ok, qk_scale, True, NEG_SCALE, PRECISION)
        return acc, m_i, l_i

    _CONFIGS = {}

    def _config(block_m, block_n, warps, stages):
        """One triton.Config object per (BLOCK_M, BLOCK_N, warps, stages): the lists below share them."""
        key = (block_m, block_n, warps, stages)
        if key not in _CONFIGS:
            _CONFIGS[key] = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                                          num_stages=stages)
        return _CONFIGS[key]

    def _table(rows):
        """{(family, products, padded head dim): [configs]} from (family, products, head dims, configs) rows."""
        return {(family, products, d): [_config(*c) for c in configs]
                for family, products, dims, configs in rows for d in dims}

    def _union(table):
        configs = []
        for listed in table.values():
            configs += [c for c in listed if not any(c is k for k in configs)]
        return configs

    def _lookup(table):
        """configs_for(family, **meta) of a table keyed by target family, products and padded head dim."""

        def configs_for(family, BLOCK_D, PRECISION, **meta):
            return table[family, "fp32" if PRECISION == "ieee" else "mma", BLOCK_D]

        return configs_for

    def _prune_by_lq(configs, named_args):
        """Drop query tiles larger than the query range needs (keep the smallest if none fit)."""
        fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["LQ_KEY"])]
        return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    # (BLOCK_M, BLOCK_N, warps, stages). On sm_90 the query tile is 64 or 128 rows, so that both products
    # are warp-group MMAs (wgmma's M is 64 per warp group); 16- or 32-row tiles would fall back to
    # mma.sync. The reuse encoder's short query ranges (Lq of 5 to 48 at 256 px, 8 steps) lose nothing
    # by it: a (batch, head)'s queries still fit one tile, so K and V are read once as with smaller
    # tiles, and at 64 query rows the tile does 64 FLOPs per byte of K/V it reads, under the H100's
    # roughly 300, so that it is bound by those reads, not by the padded rows' products. On sm_80 (Triton
    # emits mma.sync whatever the tile) head dim 128 takes 16- and 32-row tiles, whose accumulators and
    # operands fit the registers.
    FORWARD_TABLE = _table([
        ("sm90", "mma", (16, 32, 64, 128), [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)]),
        ("sm80", "mma", (16, 32, 64), [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)]),
        ("sm80", "mma", (128,), [(32, 64, 4, 3), (16, 64, 4, 3), (32, 32, 4, 2)]),
        ("sm90", "fp32", (16, 32, 64, 128), [(16, 64, 4, 2), (32, 32, 4, 2)]),
        ("sm80", "fp32", (16, 32, 64, 128), [(16, 64, 4, 2), (32, 32, 4, 2)]),
    ])
    FORWARD_CONFIGS = _union(FORWARD_TABLE)

    @triton_utils.target_autotune(FORWARD_CONFIGS,
                                  key=["LQ_KEY", "LK_KEY", "BLOCK_D", "EVEN_D", "ALIGNED", "PRECISION"],
                                  configs_for=_lookup(FORWARD_TABLE), prune=_prune_by_lq)
    @triton.jit
    def _attention_fwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, lse_ptr,
        H, Lq, Lc, Ls, D, qk_scale, LQ_KEY, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l, so_b, so_h, so_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr, NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        q = _load(_rows(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l), offs_d, m_ok, D, True, EVEN_D, ALIGNED)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, kc_ptr + b * skc_b + h * skc_h, vc_ptr + b * svc_b + h * svc_h,
                                     skc_l, svc_l, Lc, D, qk_scale, offs_d, BLOCK_N, EVEN_D, ALIGNED, NEG_SCALE,
                                     PRECISION)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, ks_ptr + b * sks_b + h * sks_h, vs_ptr + b * svs_b + h * svs_h,
                                     sks_l, svs_l, Ls, D, qk_scale, offs_d, BLOCK_N, EVEN_D, ALIGNED, NEG_SCALE,
                                     PRECISION)
        out = acc * (1.0 / l_i)[:, None]
        _store(_rows(out_ptr + b * so_b + h * so_h, offs_m, so_l), offs_d, m_ok, D, out, EVEN_D)
        tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def _attention_bwd_delta_kernel(out_ptr, do_ptr, delta_ptr, H, Lq, D, so_b, so_h, so_l, sdo_b, sdo_h, sdo_l,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                                    ALIGNED: tl.constexpr):
        """delta = rowsum(dO * O) of BLOCK_M query rows of one (batch, head), fp32."""
        bh = tl.program_id(1)
        b, h = _batch_head(bh, H)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        o = _load(_rows(out_ptr + b * so_b + h * so_h, offs_m, so_l), offs_d, m_ok, D, True, EVEN_D, ALIGNED)
        do = _load(_rows(do_ptr + b * sdo_b + h * sdo_h, offs_m, sdo_l), offs_d, m_ok, D, True, EVEN_D, ALIGNED)
        tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_ok)

    @triton.jit
    def _bwd_query_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, dqs_base, sq_l, sdo_l, start, first,
                        n_ok, Lq, D, qk_scale, offs_d, BLOCK_M: tl.constexpr, KEY_MASK: tl.constexpr,
                        QUERY_MASK: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, DV: tl.constexpr,
                        DK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr):
        """Query tile [start, start + BLOCK_M) against a key tile (k, v): adds its shares to dV (DV), dK (DK)
        and to the fp32 dQ scratch (DQ; written without reading it at the `first` key tile). Query rows
        past Lq hold q = dO = lse = delta = 0 and contribute nothing; key rows past the segment (KEY_MASK)
        get P = 0, since exp2(-lse2) may overflow there."""
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = _load(_rows(q_base, offs_m, sq_l), offs_d, m_ok, D, QUERY_MASK, EVEN_D, ALIGNED)
        do = _load(_rows(do_base, offs_m, sdo_l), offs_d, m_ok, D, QUERY_MASK, EVEN_D, ALIGNED)
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
                # dQ^T [BLOCK_D, BLOCK_M] += K^T dS^T, the scratch's rows (query rows) read transposed.
                dqs = dqs_base + offs_m[None, :].to(tl.int64) * offs_d.shape[0] + offs_d[:, None]
                if QUERY_MASK:
                    dq_t = tl.load(dqs, mask=m_ok[None, :] & (first == 0), other=0.0)
                    dq_t = tl.dot(tl.trans(k), ds_t, acc=dq_t, input_precision=PRECISION)
                    tl.store(dqs, dq_t, mask=m_ok[None, :])
                else:
                    dq_t = tl.load(dqs, mask=(first == 0) & (offs_d[:, None] >= 0), other=0.0)
                    dq_t = tl.dot(tl.trans(k), ds_t, acc=dq_t, input_precision=PRECISION)
                    tl.store(dqs, dq_t)
        return dk, dv

    @triton.jit
    def _bwd_key_tile(q_base, do_base, lse_row, delta_row, dqs_base, k_base, v_base, dk_base, dv_base, sq_l, sdo_l,
                      sk_l, sv_l, sdk_l, sdv_l, start, L, first, Lq, D, qk_scale, scale, offs_d,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_MASK: tl.constexpr, EVEN_D: tl.constexpr,
                      ALIGNED: tl.constexpr, DV: tl.constexpr, DK: tl.constexpr, DQ: tl.constexpr,
                      PRECISION: tl.constexpr):
        """Key tile [start, start + BLOCK_N) of one segment of L keys against every query tile (full tiles
        unmasked, then the partial one): stores its dV (DV) and dK (DK), adds its shares of dQ (DQ)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < L
        k = _load(_rows(k_base, n, sk_l), offs_d, n_ok, D, KEY_MASK, EVEN_D, ALIGNED)
        v = k
        if DK or DQ:
            v = _load(_rows(v_base, n, sv_l), offs_d, n_ok, D, KEY_MASK, EVEN_D, ALIGNED)
        dk = tl.zeros(k.shape, tl.float32)
        dv = tl.zeros(k.shape, tl.float32)
        if DQ:
            tl.debug_barrier()  # orders the previous key tile's dQ scratch writes before this one's reads
        full = Lq - Lq % BLOCK_M
        for m0 in range(0, full, BLOCK_M):
            dk, dv = _bwd_query_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, dqs_base, sq_l, sdo_l, m0,
                                     first, n_ok, Lq, D, qk_scale, offs_d, BLOCK_M, KEY_MASK, False, EVEN_D, ALIGNED,
                                     DV, DK, DQ, PRECISION)
        if full < Lq:
            dk, dv = _bwd_query_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, dqs_base, sq_l, sdo_l, full,
                                     first, n_ok, Lq, D, qk_scale, offs_d, BLOCK_M, KEY_MASK, True, EVEN_D, ALIGNED,
                                     DV, DK, DQ, PRECISION)
        if DV:
            _store(_rows(dv_base, n, sdv_l), offs_d, n_ok, D, dv, EVEN_D)
        if DK:
            _store(_rows(dk_base, n, sdk_l), offs_d, n_ok, D, dk * scale, EVEN_D)

    # (BLOCK_M, BLOCK_N, warps, stages): 64 or 128 key rows (the M of four of the five products), one warp
    # group per 64 (more warps would compute the same rows twice: Triton keeps chained products' warps
    # along M); 16 query rows, which keep the fp32 accumulators and the dQ tile in registers. Per target
    # family, products, padded head dim and row alignment: the launches (see above) and each one's configs.
    def _launches(plan, *configs):
        """{products: [configs]}: the launches of `plan` (ONE_PASS, KV_THEN_Q, PER_GRADIENT), each with its
        configs (one tuple of them for every launch, or one per launch)."""
        configs = configs if len(configs) == len(plan) else configs * len(plan)
        return {products: [_config(*c) for c in listed] for products, listed in zip(plan, configs)}

    _ONE = ((16, 128, 8, 2), (16, 64, 4, 1), (16, 128, 8, 1))
    _W8 = ((16, 128, 8, 1),)
    BACKWARD_PLANS = {
        ("sm90", "mma", 64, True): _launches(ONE_PASS, _ONE),
        ("sm90", "mma", 64, False): _launches(PER_GRADIENT, _W8 + ((16, 64, 4, 1),), ((16, 64, 4, 1), (16, 64, 4, 2)),
                                              _W8),
        ("sm90", "mma", 128, True): _launches(PER_GRADIENT, _ONE + ((32, 128, 8, 2),)),
        ("sm80", "mma", 64, True): _launches(KV_THEN_Q, ((16, 128, 8, 1), (16, 64, 4, 2))),
        ("sm80", "mma", 64, False): _launches(PER_GRADIENT, _W8),
        ("sm80", "mma", 128, True): _launches(PER_GRADIENT, ((16, 128, 8, 2), (16, 128, 8, 1))),
    }
    # Unaligned rows at head dim 128 as aligned ones; fp32 (FMA products) one launch per gradient.
    BACKWARD_PLANS.update({(family, "mma", 128, False): BACKWARD_PLANS[family, "mma", 128, True]
                           for family in ("sm80", "sm90")})
    BACKWARD_PLANS.update({(family, "fp32", block_d, aligned): _launches(PER_GRADIENT, ((16, 64, 4, 1),))
                           for family in ("sm80", "sm90") for block_d in (64, 128) for aligned in (True, False)})
    # fp32 pads the head dim only to 16 or 32 (FMA products have no minimum M): one pass of the five
    # products in 16 x 16 tiles, 8 warps at 32 (GPU tensors stop there, TRITON_FP32_MAX_D).
    BACKWARD_PLANS.update({(family, "fp32", block_d, aligned): _launches(ONE_PASS, ((16, 16, warps, 1),))
                           for family in ("sm80", "sm90") for block_d, warps in ((16, 4), (32, 8))
                           for aligned in (True, False)})
    BACKWARD_CONFIGS = _union({(key, products): configs for key, plan in BACKWARD_PLANS.items()
                               for products, configs in plan.items()})

    def _backward_configs_for(family, BLOCK_D, PRECISION, ALIGNED, DV, DK, DQ, **meta):
        plan = BACKWARD_PLANS[family, "fp32" if PRECISION == "ieee" else "mma", BLOCK_D, ALIGNED]
        return plan[tuple(name for name, on in (("dV", DV), ("dK", DK), ("dQ", DQ)) if on)]

    @triton_utils.target_autotune(BACKWARD_CONFIGS,
                                  key=["LQ_KEY", "LK_KEY", "BLOCK_D", "EVEN_D", "ALIGNED", "DV", "DK", "DQ",
                                       "PRECISION"],
                                  configs_for=_backward_configs_for)
    @triton.jit
    def _attention_bwd_kernel(
        q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, do_ptr, lse_ptr, delta_ptr,
        dq_ptr, dqs_ptr, dkc_ptr, dvc_ptr, dks_ptr, dvs_ptr,
        H, Lq, Lc, Ls, D, qk_scale, scale, LQ_KEY, LK_KEY,
        sq_b, sq_h, sq_l, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l, sks_b, sks_h, sks_l, svs_b, svs_h, svs_l,
        sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l, sdkc_b, sdkc_h, sdkc_l,
        sdvc_b, sdvc_h, sdvc_l, sdks_b, sdks_h, sdks_l, sdvs_b, sdvs_h, sdvs_l,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr, DV: tl.constexpr, DK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """The gradients DV, DK, DQ of one (batch, head): the key tiles of the context, then of the self
        segment (one loop, each segment from its own pointers), each against every query tile."""
        bh = tl.program_id(0)
        b, h = _batch_head(bh, H)
        offs_d = tl.arange(0, BLOCK_D)
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sdo_b + h * sdo_h
        lse_row = lse_ptr + bh.to(tl.int64) * Lq
        delta_row = delta_ptr + bh.to(tl.int64) * Lq
        dqs_base = dqs_ptr + bh.to(tl.int64) * Lq * BLOCK_D  # the fp32 dQ scratch, (B * H, Lq, BLOCK_D)
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
            first_segment = ctx | (Lc == 0)  # its first key tile writes the dQ scratch without reading it
            full = L - L % BLOCK_N
            for start in range(0, full, BLOCK_N):
                _bwd_key_tile(q_base, do_base, lse_row, delta_row, dqs_base, k_base, v_base, dk_base, dv_base, sq_l,
                              sdo_l, sk_l, sv_l, sdk_l, sdv_l, start, L, (start == 0) & first_segment, Lq, D,
                              qk_scale, scale, offs_d, BLOCK_M, BLOCK_N, False, EVEN_D, ALIGNED, DV, DK, DQ, PRECISION)
            if full < L:
                _bwd_key_tile(q_base, do_base, lse_row, delta_row, dqs_base, k_base, v_base, dk_base, dv_base, sq_l,
                              sdo_l, sk_l, sv_l, sdk_l, sdv_l, full, L, (full == 0) & first_segment, Lq, D,
                              qk_scale, scale, offs_d, BLOCK_M, BLOCK_N, True, EVEN_D, ALIGNED, DV, DK, DQ, PRECISION)
        if DQ:  # dQ = scale * the scratch, in dQ's dtype
            tl.debug_barrier()
            dq_base = dq_ptr + b * sdq_b + h * sdq_h
            for start in range(0, Lq, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                m_ok = offs_m < Lq
                dq = tl.load(dqs_base + offs_m[:, None].to(tl.int64) * BLOCK_D + offs_d[None, :], mask=m_ok[:, None])
                _store(_rows(dq_base, offs_m, sdq_l), offs_d, m_ok, D, dq * scale, EVEN_D)


def _bucket(n):
    """Power-of-two bucket of a sequence length, for autotuning keys (1024 and up share one)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1024)


def _triton_meta(tensors, min_block_d=16):
    """Padded head dim, whether every row of the (B, H, L, D) `tensors` is 16-byte aligned (start and
    length: the condition for asynchronous tile copies), and the dot precision: exact fp32 products for
    fp32 inputs (no TF32)."""
    q = tensors[0]
    D = q.shape[-1]
    block_d = max(min_block_d, triton.next_power_of_2(D))
    aligned = all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3])
                  for t in tensors) and D * q.element_size() % 16 == 0
    return dict(BLOCK_D=block_d, EVEN_D=block_d == D, ALIGNED=aligned,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _bhl_strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


DELTA_BLOCK_M = 32  # query rows per program of the delta kernel


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
    meta = dict(_triton_meta((q, k_ctx, v_ctx, k_self, v_self)), NEG_SCALE=scale < 0)
    triton_utils.launch(_attention_fwd_kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H), args, meta,
                        config, (q.dtype, *buckets, *meta.values()))
    return out, lse


def asymmetric_attention_backward_triton(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, *,
                                         config=None, passes=None):
    """Gradients on the Triton kernels: delta = rowsum(dO * O), then per pass one program per (batch,
    head). `config` (a triton.Config) bypasses autotuning and `passes` (ONE_PASS, KV_THEN_Q or
    PER_GRADIENT) overrides the target's plan; tests use both to run every configuration of every pass."""
    B, H, Lq, D = q.shape
    Lc, Ls = k_ctx.shape[2], k_self.shape[2]
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k_ctx, v_ctx, k_self, v_self)]
    if Lq == 0 or B * H * D == 0:
        return tuple(g.zero_() for g in grads)
    if grad_out.stride(-1) != 1:  # autograd may hand over an expanded gradient
        grad_out = grad_out.contiguous()
    delta_meta = _triton_meta((out, grad_out))
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(triton.cdiv(Lq, DELTA_BLOCK_M), B * H)](
        out, grad_out, delta, H, Lq, D, *_bhl_strides(out, grad_out), BLOCK_M=DELTA_BLOCK_M,
        BLOCK_D=delta_meta["BLOCK_D"], EVEN_D=delta_meta["EVEN_D"], ALIGNED=delta_meta["ALIGNED"])
    # Tensor-core products pad the head dim (their M in the key-major form) to 64; fp32 ones to 16.
    meta = _triton_meta((q, k_ctx, v_ctx, k_self, v_self, grad_out), min_block_d=16 if q.dtype == torch.float32 else 64)
    scratch = torch.empty((B * H, Lq, meta["BLOCK_D"]), dtype=torch.float32, device=q.device)
    buckets = _bucket(Lq), _bucket(Lc + Ls)
    args = (q, k_ctx, v_ctx, k_self, v_self, grad_out, lse, delta, grads[0], scratch, *grads[1:], H, Lq, Lc, Ls, D,
            scale * LOG2E, scale, *buckets, *_bhl_strides(q, k_ctx, v_ctx, k_self, v_self, grad_out, *grads))
    if passes is None:
        family = triton_utils.target_family(triton_utils.capability([q]))
        products = "fp32" if meta["PRECISION"] == "ieee" else "mma"
        passes = tuple(BACKWARD_PLANS[family, products, meta["BLOCK_D"], meta["ALIGNED"]])
    for products in passes:
        pass_meta = dict(meta, DV="dV" in products, DK="dK" in products, DQ="dQ" in products)
        triton_utils.launch(_attention_bwd_kernel, lambda m: (B * H,), args, pass_meta, config,
                            (q.dtype, *buckets, *pass_meta.values()))
    return tuple(grads)


def _kernel_why_not(*tensors, max_d, dtypes, what):
    """Limits shared by the Triton and CUDA attention kernels."""
    q = tensors[0]
    reasons = _checks.dtype_reasons(f"the {what} attention kernels", q, dtypes)
    if q.shape[-1] > max_d:
        reasons.append(f"head dim {q.shape[-1]} is above the {what} kernels' {max_d}")
    return reasons + _checks.strided_rows_reasons(**dict(zip(("q", "k_ctx", "v_ctx", "k_self", "v_self"), tensors)))


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


# fp32 takes exact products (FMA loops, no tensor cores), which hold each thread's rows of both operands
# over the whole head dim: above TRITON_FP32_MAX_D they spill registers in every tile on sm_80 and sm_90
# (docs/OPS.md, Triton kernels: resources), so GPU tensors go to the next backend (the interpreter has no
# registers and keeps checking the same program on CPU tensors).
TRITON_FP32_MAX_D = 32


def _triton_why_not(q, k_ctx, v_ctx, k_self, v_self):
    reasons = _kernel_why_not(q, k_ctx, v_ctx, k_self, v_self, max_d=TRITON_MAX_D, dtypes=TRITON_DTYPES, what="Triton")
    if q.device.type != "cpu" and q.dtype == torch.float32 and q.shape[-1] > TRITON_FP32_MAX_D:
        reasons.append(f"float32 at head dim {q.shape[-1]}: the Triton kernels' exact fp32 products spill registers "
                       f"above head dim {TRITON_FP32_MAX_D} (fp16 and bf16 run on tensor cores at any head dim)")
    return reasons


def _triton_forward_why_not(q, k_ctx, v_ctx, k_self, v_self, scale):
    return _triton_why_not(q, k_ctx, v_ctx, k_self, v_self)


def _triton_backward_why_not(grad_out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale):
    return _triton_why_not(q, k_ctx, v_ctx, k_self, v_self)


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
