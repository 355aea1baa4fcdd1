"""The enat:: library: schemas, the compiled extension, and the CUDA build it came from."""

import os

import pytest
import torch

import enat_kernels
from enat_kernels import _library

from helpers import needs_gpu


def _schema_of(schema_text):
    return torch._C.parse_schema("enat::" + schema_text)


@pytest.mark.parametrize("schema", _library.SCHEMAS, ids=lambda s: s.split("(")[0])
def test_registered_schema_matches_python_table(schema):
    """Whether the schemas came from csrc/ops.cpp or from _library.py, they are the same."""
    expected = _schema_of(schema)
    op = getattr(torch.ops.enat, expected.name.removeprefix("enat::")).default
    assert str(op._schema) == str(expected)


CUDA_KERNELS = [
    "asymmetric_attention_cuda", "gather_tokens_cuda", "mask_to_index_cuda", "scatter_tokens_cuda",
    "scatter_tokens_inplace_cuda", "scatter_into_zeros_cuda", "zero_rows_cuda", "split_tokens_cuda",
    "restore_tokens_cuda", "merge_cache_cuda", "merge_cache_backward_cuda",
]


def test_extension_is_built_when_required():
    """CI sets ENAT_KERNELS_REQUIRE_EXTENSION=1 so that a csrc/ that fails to compile fails the run."""
    if os.environ.get("ENAT_KERNELS_REQUIRE_EXTENSION") == "1":
        assert enat_kernels.EXTENSION_LOADED, enat_kernels.EXTENSION_ERROR
    if not enat_kernels.EXTENSION_LOADED:
        assert "enat_kernels._C" in enat_kernels.EXTENSION_ERROR
        return
    for name in CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"enat::{name}", "CUDA"), name
    schema = torch.ops.enat.asymmetric_attention_cuda.default._schema
    assert str(schema) == (
        "enat::asymmetric_attention_cuda(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_self, Tensor v_self, "
        "float scale) -> (Tensor, Tensor)"
    )


@needs_gpu
def test_cuda_kernel_checks_inputs_before_launch():
    """The C++ launcher's own checks name the argument and show the shape."""
    x = torch.randn(2, 5, 3, device="cuda")
    with pytest.raises(TypeError, match=r"index must be Long, got Int\[2, 1\]"):
        torch.ops.enat.gather_tokens_cuda(x, torch.zeros(2, 1, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match=r"index.shape\[0\] must equal x.shape\[0\]"):
        torch.ops.enat.gather_tokens_cuda(x, torch.zeros(3, 1, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        torch.ops.enat.gather_tokens_cuda(x.transpose(1, 2), torch.zeros(2, 1, dtype=torch.long, device="cuda"))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64])
@pytest.mark.parametrize("D", [1, 3, 8, 61, 1024])
def test_cuda_gather_kernel_on_gpu(dtype, D):
    """The CUDA kernel called directly on aligned, odd-sized, strided and offset rows (each takes a
    different copy width), with NaN past the logical end."""
    from helpers import padded, strided

    B, L, n = 3, 37, 11
    x = (torch.randn(B, L, D, device="cuda") * 100).to(dtype)
    rows = torch.arange(B, device="cuda")[:, None]
    index = torch.stack([torch.sort(torch.randperm(L - 1, device="cuda")[:n]).values for _ in range(B)])
    for view in (x, padded(x), strided(x), x[:, 1:]):
        assert torch.equal(torch.ops.enat.gather_tokens_cuda(view, index), view[rows, index])
