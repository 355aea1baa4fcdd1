"""ENAT run the way the paper's code runs it, for side-by-side comparisons with the same weights.

The same modules and sampler with four changes: attention concatenates [context ; self] keys and
values and runs naive matmul-softmax-matmul; norms, modulations and gated residuals are separate
PyTorch ops; token rows move by boolean-mask indexing (a host sync
and several launches each on a GPU); the two CFG branches run as two passes. On a GPU it runs under
fp16 autocast, as the paper's code does; on a CPU in the model's dtype (CPU fp16 matmuls are
emulated and would make the comparison meaningless).
"""

import torch
import torch.nn.functional as F

from .model import ops_swapped
from .sampler import sample as _sample


class PaperStyleOps:
    """The model's ops (see enat.model.KernelOps) in the paper code's style; a selector is the mask."""

    @staticmethod
    def attention(q, k_ctx, v_ctx, k_self, v_self):
        k = torch.cat([k_ctx, k_self], dim=2)
        v = torch.cat([v_ctx, v_self], dim=2)
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return attn.softmax(dim=-1) @ v

    @staticmethod
    def split(x, mask, n_masked=None):
        B, _, D = x.shape
        return x[~mask].reshape(B, -1, D), x[mask].reshape(B, -1, D)

    @staticmethod
    def restore(visible, masked, mask):
        out = visible.new_empty(*mask.shape, visible.shape[-1])
        out[~mask] = visible.reshape(-1, visible.shape[-1])
        out[mask] = masked.reshape(-1, masked.shape[-1])
        return out

    @staticmethod
    def adaln(x, shift, scale, eps):
        x = F.layer_norm(x, x.shape[-1:], eps=eps)
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    @staticmethod
    def residual_adaln(x, y, gate, shift, scale, eps):
        x = x + gate.unsqueeze(1) * y
        return x, PaperStyleOps.adaln(x, shift, scale, eps)

    @staticmethod
    def positions(mask, count=None):
        return mask

    @staticmethod
    def gather(x, mask):
        return x[mask].reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def merge(fresh, fresh_mask, cached, cached_mask):
        full = fresh.new_zeros(*fresh_mask.shape, fresh.shape[-1])
        full[fresh_mask] = fresh.reshape(-1, fresh.shape[-1])
        full[cached_mask] = cached.reshape(-1, cached.shape[-1])
        return full[fresh_mask | cached_mask].reshape(fresh.shape[0], -1, fresh.shape[-1])


def paper_ops(model):
    """Within the block, `model` runs with PaperStyleOps."""
    return ops_swapped(model, PaperStyleOps)


def sample(model, labels, **kwargs):
    """enat.sample (same arguments) the paper code's way: PaperStyleOps, two CFG passes, fp16 autocast
    on a GPU."""
    with paper_ops(model), torch.autocast("cuda", torch.float16, enabled=labels.device.type == "cuda"):
        return _sample(model, labels, cfg_batch=False, **kwargs)
