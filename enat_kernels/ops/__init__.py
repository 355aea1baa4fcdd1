"""enat_kernels.ops: the op contract (asymmetric attention, critical-token movement, adaLN).

Every function validates its inputs, picks a backend (see enat_kernels.backends) and calls the
registered torch.library op enat::<name>, so it works eagerly, under autograd and under
torch.compile(fullgraph=True).
"""

from .adaln import adaln, residual_adaln
from .asymmetric_attention import asymmetric_attention
from .gather_scatter import gather_tokens, scatter_tokens, scatter_tokens_
from .mask_to_index import mask_to_index
from .merge_cache import merge_cache
from .split_restore import restore_tokens, split_tokens

__all__ = [
    "asymmetric_attention",
    "mask_to_index",
    "gather_tokens",
    "scatter_tokens",
    "scatter_tokens_",
    "split_tokens",
    "restore_tokens",
    "merge_cache",
    "adaln",
    "residual_adaln",
]
