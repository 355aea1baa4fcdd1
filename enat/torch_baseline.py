"""ENAT in plain PyTorch, as a user would write it without this package: the strong baseline of the
benchmarks.

The same modules, weights and sampler (batched guidance, counts known from the schedule, no host
sync) with the model's ops written in plain PyTorch: attention by F.scaled_dot_product_attention over
K/V concatenated with torch.cat, token rows moved by torch.gather / scatter at positions from a
stable argsort of the mask (no boolean indexing, so no host sync), norms by F.layer_norm followed by
the modulation. With half-precision weights and enat.GraphedSampler it is the fastest the same
model runs without enat_kernels; with the same weights and generator it gives the ids of
enat.sample (tested).
"""

import torch
import torch.nn.functional as F

from .model import ops_swapped
from .sampler import sample as _sample


def _rows(index, D):
    return index.unsqueeze(-1).expand(-1, -1, D)


class TorchOps:
    """The model's ops (see enat.model.KernelOps) in plain PyTorch; a selector is a (B, n) position tensor."""

    @staticmethod
    def attention(q, k_ctx, v_ctx, k_self, v_self):
        return F.scaled_dot_product_attention(q, torch.cat([k_ctx, k_self], 2), torch.cat([v_ctx, v_self], 2))

    @staticmethod
    def positions(mask, count):
        """Positions of the True entries of mask (B, L), ascending: (B, count)."""
        return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]

    @staticmethod
    def gather(x, index):
        return torch.gather(x, 1, _rows(index, x.shape[2]))

    @staticmethod
    def split(x, mask, n_masked):
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible positions, then masked ones
        rows = torch.gather(x, 1, _rows(order, x.shape[2]))
        return rows[:, : x.shape[1] - n_masked], rows[:, x.shape[1] - n_masked:]

    @staticmethod
    def restore(visible, masked, mask):
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
        rows = torch.cat([visible, masked], 1)
        return torch.empty_like(rows).scatter_(1, _rows(order, rows.shape[2]), rows)

    @staticmethod
    def merge(fresh, fresh_index, cached, cached_index):
        order = torch.argsort(torch.cat([fresh_index, cached_index], 1), dim=1)
        return torch.gather(torch.cat([fresh, cached], 1), 1, _rows(order, fresh.shape[2]))

    @staticmethod
    def adaln(x, shift, scale, eps):
        return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    @staticmethod
    def residual_adaln(x, y, gate, shift, scale, eps):
        x = torch.addcmul(x, gate.unsqueeze(1), y)
        return x, TorchOps.adaln(x, shift, scale, eps)


def torch_ops(model):
    """Within the block, `model` runs with TorchOps (also while a GraphedSampler captures it)."""
    return ops_swapped(model, TorchOps)


def sample(model, labels, **kwargs):
    """enat.sample (same arguments) with TorchOps."""
    with torch_ops(model):
        return _sample(model, labels, **kwargs)
