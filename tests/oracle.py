"""An independent fp64 oracle for the enat:: ops, written from the op contract (docs/OPS.md).

Deliberately not the package's reference code: attention concatenates K and V and uses
torch.softmax in float64; token movement uses per-row Python loops, boolean indexing and sorted().
Slow and obviously correct; these are the ground truth of the tests.
"""

import torch

# The magnitudes the error budget's floor is relative to (docs/OPS.md, Tolerances).
from enat_kernels.testing import adaln_error_scales, attention_error_scales  # noqa: F401

# Attention.


def attention(q, k_ctx, v_ctx, k_self, v_self, scale=None):
    """(out, lse) in float64: softmax(q @ [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self].

    Differentiable (plain autograd through float64 ops) when the inputs require grad.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k = torch.cat([k_ctx.double(), k_self.double()], dim=2)
    v = torch.cat([v_ctx.double(), v_self.double()], dim=2)
    scores = q.double() @ k.transpose(-1, -2) * scale
    out = torch.softmax(scores, dim=-1) @ v
    lse = torch.logsumexp(scores, dim=-1)
    return out, lse


def attention_same_dtype(q, k_ctx, v_ctx, k_self, v_self, scale=None):
    """The naive PyTorch computation done entirely in the input dtype (cat + matmul + softmax):
    the baseline of the FlashAttention error rule."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k = torch.cat([k_ctx, k_self], dim=2)
    v = torch.cat([v_ctx, v_self], dim=2)
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v


# Token movement (exact; every function returns a fresh tensor in the input dtype).


def _stack_rows(rows, like, n):
    """Stack per-batch (n, D) tensors into (B, n, D), also when B == 0 or n == 0."""
    if rows:
        return torch.stack(rows)
    return like.new_empty((0, n, like.shape[-1]))


def mask_to_index(mask):
    """(B, n) int64: the True positions of each row of mask (B, L), ascending. Rows must agree on n."""
    rows = [torch.nonzero(mask[b], as_tuple=False).flatten() for b in range(mask.shape[0])]
    counts = {len(r) for r in rows}
    assert len(counts) <= 1, f"oracle: rows with different counts {counts}"
    if not rows:
        return torch.empty((0, 0), dtype=torch.int64)
    return torch.stack(rows).to(torch.int64)


def gather(x, index):
    """out[b, j] = x[b, index[b, j]]."""
    B, n = index.shape
    out = x.new_empty((B, n, x.shape[2]))
    for b in range(B):
        for j in range(n):
            out[b, j] = x[b, int(index[b, j])]
    return out


def scatter(base, index, src):
    """A copy of base with out[b, index[b, j]] = src[b, j]."""
    out = base.clone()
    B, n = index.shape
    for b in range(B):
        for j in range(n):
            out[b, int(index[b, j])] = src[b, j]
    return out


def split(x, mask):
    """(visible, masked): the rows of x where mask is False / True, ascending positions."""
    B = x.shape[0]
    visible = [x[b][~mask[b]] for b in range(B)]
    masked = [x[b][mask[b]] for b in range(B)]
    n = int(mask[0].sum()) if B else 0
    return _stack_rows(visible, x, x.shape[1] - n), _stack_rows(masked, x, n)


def restore(visible, masked, mask):
    """The (B, L, D) sequence with visible rows where mask is False and masked rows where True."""
    B, L = mask.shape
    out = visible.new_zeros((B, L, visible.shape[2]))
    for b in range(B):
        out[b][~mask[b]] = visible[b]
        out[b][mask[b]] = masked[b]
    return out


def merge(fresh, fresh_index, cached, cached_index):
    """Rows of fresh and cached, together, sorted by their positions."""
    B = fresh.shape[0]
    rows = []
    for b in range(B):
        items = [(int(p), fresh[b, j]) for j, p in enumerate(fresh_index[b].tolist())]
        items += [(int(p), cached[b, j]) for j, p in enumerate(cached_index[b].tolist())]
        positions = [p for p, _ in items]
        assert len(set(positions)) == len(positions), "oracle: overlapping positions"
        ordered = [row for _, row in sorted(items, key=lambda item: item[0])]
        if ordered:
            rows.append(torch.stack(ordered))
        else:
            rows.append(fresh.new_empty((0, fresh.shape[2])))
    return _stack_rows(rows, fresh, fresh.shape[1] + cached.shape[1])


# Random inputs for the token tests.


def random_mask(B, L, n, generator=None):
    """A (B, L) bool mask with exactly n True entries per row, at random positions."""
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(L, generator=generator)[:n]] = True
    return mask


def random_index(B, L, n, generator=None):
    """A (B, n) int64 index: n distinct ascending positions in [0, L) per row."""
    rows = [sorted(torch.randperm(L, generator=generator)[:n].tolist()) for _ in range(B)]
    return torch.tensor(rows, dtype=torch.int64).reshape(B, n)


def random_tensor(shape, dtype, generator=None):
    """Distinct-looking values in any dtype (ints in a small range, floats normal)."""
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype)
    return torch.randint(-1000, 1000, shape, dtype=torch.int64, generator=generator).to(dtype)


# adaLN (adaln, residual_adaln): LayerNorm over the last dim (biased variance, no affine weights), then
# x * (1 + scale) + shift with one (shift, scale) row per batch row.


def adaln(x, shift, scale, eps=1e-6):
    """float64 (B, L, d): (x - mean) / sqrt(var + eps) * (1 + scale[b]) + shift[b]. Differentiable."""
    x = x.double()
    d = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / d
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / d
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale.double()[:, None, :]) + shift.double()[:, None, :]


def residual_adaln(x, y, gate, shift, scale, eps=1e-6):
    """float64 (x_new, out): x_new = x + gate[b] * y, out = adaln(x_new, shift, scale)."""
    x_new = x.double() + gate.double()[:, None, :] * y.double()
    return x_new, adaln(x_new, shift, scale, eps)


def adaln_same_dtype(x, shift, scale, eps=1e-6):
    """The unfused PyTorch computation in the input dtype (F.layer_norm, then modulate): the baseline
    of the error rule."""
    normed = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    return normed * (1 + scale[:, None, :]) + shift[:, None, :]


def residual_adaln_same_dtype(x, y, gate, shift, scale, eps=1e-6):
    x_new = x + gate[:, None, :] * y
    return x_new, adaln_same_dtype(x_new, shift, scale, eps)
