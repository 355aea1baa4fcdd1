"""The enat:: operator library.

When the CUDA extension is built, importing ``enat_kernels._C`` defines the schemas (csrc/ops.cpp)
and registers the CUDA kernels. Without it, the same public schemas are defined here, so every op
works with the reference and Triton backends either way.
"""

import torch

# Public schemas, in the order of csrc/ops.cpp (tests/test_library.py checks that they agree).
SCHEMAS = (
    "asymmetric_attention(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_self, Tensor v_self, "
    "float scale, str backend) -> (Tensor, Tensor)",
    "asymmetric_attention_backward(Tensor grad_out, Tensor q, Tensor k_ctx, Tensor v_ctx, "
    "Tensor k_self, Tensor v_self, Tensor out, Tensor lse, float scale, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "mask_to_index(Tensor mask, SymInt count, str backend) -> Tensor",
    "gather_tokens(Tensor x, Tensor index, str backend) -> Tensor",
    "scatter_tokens(Tensor base, Tensor index, Tensor src, str backend) -> Tensor",
    "scatter_tokens_(Tensor(a!) base, Tensor index, Tensor src, str backend) -> ()",
    "split_tokens(Tensor x, Tensor mask, SymInt n_masked, str backend) -> (Tensor, Tensor)",
    "restore_tokens(Tensor visible, Tensor masked, Tensor mask, str backend) -> Tensor",
    "merge_cache(Tensor fresh, Tensor fresh_index, Tensor cached, Tensor cached_index, str backend) -> Tensor",
    # Backward-only ops, one launch each.
    "scatter_into_zeros(Tensor index, Tensor src, SymInt L, str backend) -> Tensor",
    "zero_rows(Tensor x, Tensor index, str backend) -> Tensor",
    "merge_cache_backward(Tensor grad, Tensor fresh_index, Tensor cached_index, str backend) -> (Tensor, Tensor)",
)


def _load_extension():
    try:
        from enat_kernels import _C  # noqa: F401  (registers the enat:: library)
    except ImportError as e:
        return False, f"the CUDA extension enat_kernels._C is not built or does not load ({e})"
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = _load_extension()

if not EXTENSION_LOADED:
    _schemas = torch.library.Library("enat", "DEF")
    for _schema in SCHEMAS:
        _schemas.define(_schema)

# Kernels of the public ops (one Python router per op, for CPU and CUDA tensors).
LIB = torch.library.Library("enat", "IMPL")


def register_router(name, router):
    """Register `router` as the CPU and CUDA kernel of enat::<name>."""
    LIB.impl(name, router, "CPU")
    LIB.impl(name, router, "CUDA")


def register_cuda_fake(name, fake):
    """The fake (shape) kernel of the CUDA kernel op enat::<name>, when the extension is loaded."""
    if EXTENSION_LOADED:
        torch.library.register_fake(f"enat::{name}")(fake)
