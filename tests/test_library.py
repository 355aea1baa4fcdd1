"""The enat:: library: schemas, the compiled extension, and the CUDA build it came from."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import enat_kernels
from enat_kernels import backends

from helpers import needs_gpu


ROOT = Path(__file__).resolve().parents[1]
CPP_DEFS = re.compile(r'm\.def\("(\w+)\(')
CPP_IMPLS = re.compile(r'm\.impl\("(\w+)"')
PY_DEFS = re.compile(r'define\(\s*"(\w+)\(')

# The ops of the registry: the public ops of the op contract (docs/OPS.md) and the backward-only ops
# their autograd uses, each with its dispatcher.
PUBLIC_OPS = set(backends.DISPATCHERS)

# The CUDA kernel ops of the extension (csrc/ops.cpp).
CUDA_KERNELS = [
    "asymmetric_attention_cuda", "gather_tokens_cuda", "mask_to_index_cuda", "scatter_tokens_cuda",
    "scatter_tokens_inplace_cuda", "scatter_into_zeros_cuda", "zero_rows_cuda", "split_tokens_cuda",
    "restore_tokens_cuda", "merge_cache_cuda", "merge_cache_backward_cuda",
]


def _found(pattern, files):
    return [m.group(1) for f in files for m in pattern.finditer(f.read_text())]


def test_each_public_op_is_defined_once_in_python():
    """One definition per op: the op modules define every public op (with its router and fake kernel)
    exactly once, and C++ defines none of them."""
    defined = _found(PY_DEFS, sorted((ROOT / "enat_kernels" / "ops").glob("*.py")))
    assert sorted(defined) == sorted(PUBLIC_OPS)
    assert set(enat_kernels.ops.__all__) <= PUBLIC_OPS and set(backends.ENTRIES) == set(enat_kernels.ops.__all__)
    registered = {n.removeprefix("enat::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("enat::")}
    assert PUBLIC_OPS <= registered
    for name in PUBLIC_OPS:
        assert str(getattr(torch.ops.enat, name).default._schema).endswith(
            ("str backend) -> Tensor", "str backend) -> ()", "str backend) -> (Tensor, Tensor)",
             "str backend) -> (Tensor, Tensor, Tensor)",
             "str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"))


def test_cpp_defines_only_the_cuda_kernels_it_implements():
    """csrc/ops.cpp defines `*_cuda` schemas only, each implemented once in csrc/cuda and called by a
    backend in enat_kernels/ops."""
    defined = _found(CPP_DEFS, [ROOT / "csrc" / "ops.cpp"])
    assert defined and all(name.endswith("_cuda") for name in defined), defined
    assert sorted(defined) == sorted(CUDA_KERNELS)
    assert sorted(_found(CPP_IMPLS, sorted((ROOT / "csrc" / "cuda").glob("*.cu")))) == sorted(defined)
    python = "".join(f.read_text() for f in (ROOT / "enat_kernels" / "ops").glob("*.py"))
    for name in defined:
        assert f"torch.ops.enat.{name}" in python, name


def test_extension_is_built_when_required():
    """CI sets ENAT_KERNELS_REQUIRE_EXTENSION=1 so that a csrc/ that fails to compile fails the run."""
    if os.environ.get("ENAT_KERNELS_REQUIRE_EXTENSION") == "1":
        assert enat_kernels.EXTENSION_LOADED, enat_kernels.EXTENSION_ERROR
        assert enat_kernels.CPU_KERNELS_LOADED, enat_kernels.CPU_KERNELS_ERROR
    if not enat_kernels.CPU_KERNELS_LOADED:
        assert "enat_kernels._cpu" in enat_kernels.CPU_KERNELS_ERROR
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


def test_missing_extension_is_reported_plainly(monkeypatch):
    """No enat_kernels._C module: the reason says it is not built (not a circular import)."""
    import importlib.util

    from enat_kernels import _library

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    loaded, error = _library._load_extension()
    assert not loaded and error.startswith("the CUDA extension enat_kernels._C is not built: pip install -e .")


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


def test_extension_exports_only_its_entry_points():
    """Built with hidden visibility: the only functions the Python module exports are PyInit__C and
    the C++ API of csrc/enat_kernels.h (enat::*_cuda), so no inline library code it contains can
    interpose on another library's copy. (Type information of exception and kernel classes stays
    visible, as C++ requires for exceptions that cross libraries.)"""
    if not enat_kernels.EXTENSION_LOADED:
        pytest.skip(f"the extension is not built: {enat_kernels.EXTENSION_ERROR}")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    from enat_kernels import _C

    out = subprocess.run([nm, "-D", "--defined-only", "--demangle", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    exported = [line.split(" ", 2)[2] for line in out.splitlines() if line.split(" ")[1] in "TWi"]  # functions
    api = re.compile(r"^enat::(%s)\(" % "|".join(CUDA_KERNELS))
    unexpected = [name for name in exported if name != "PyInit__C" and not api.match(name)]
    assert "PyInit__C" in exported
    assert not unexpected, unexpected[:20]


# Each *_cuda kernel called with a bad argument. Run in a child process, so that a crash in the
# extension's error path fails the test instead of killing the test run.
BAD_CALLS = """
import torch, enat_kernels
ops = torch.ops.enat
x = torch.randn(2, 5, 8, device="cuda")
ix = torch.tensor([[0, 2], [1, 3]], device="cuda")
mask = torch.zeros(2, 5, dtype=torch.bool, device="cuda")
mask[:, :2] = True
q = torch.randn(1, 2, 3, 16, device="cuda", dtype=torch.half)
calls = {
    "asymmetric_attention_cuda": lambda: ops.asymmetric_attention_cuda(q[0], q, q, q, q, 0.25),
    "gather_tokens_cuda": lambda: ops.gather_tokens_cuda(x, ix.int()),
    "mask_to_index_cuda": lambda: ops.mask_to_index_cuda(mask, -1),
    "scatter_tokens_cuda": lambda: ops.scatter_tokens_cuda(x, ix, x),
    "scatter_tokens_inplace_cuda": lambda: ops.scatter_tokens_inplace_cuda(x[:1].expand(2, 5, 8), ix, x[:, :2]),
    "scatter_into_zeros_cuda": lambda: ops.scatter_into_zeros_cuda(ix, x[:, :2], 1),
    "zero_rows_cuda": lambda: ops.zero_rows_cuda(x.cpu(), ix),
    "split_tokens_cuda": lambda: ops.split_tokens_cuda(x, mask, 6),
    "restore_tokens_cuda": lambda: ops.restore_tokens_cuda(x[:, :3], x[:, :2], mask[:, :4]),
    "merge_cache_cuda": lambda: ops.merge_cache_cuda(x[:, :2], ix, x[:, :3].half(), ix),
    "merge_cache_backward_cuda": lambda: ops.merge_cache_backward_cuda(x, ix, ix),
}
for name, call in calls.items():
    print(name, end=" ", flush=True)
    try:
        call()
    except Exception as e:
        print(type(e).__name__, flush=True)
    else:
        print("no error", flush=True)
"""


@needs_gpu
def test_every_cuda_kernel_raises_on_bad_arguments():
    """A bad argument to any enat::*_cuda op is a Python exception naming it, never a crash."""
    result = subprocess.run([sys.executable, "-c", BAD_CALLS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the process died ({result.returncode}) after: {result.stdout}\n{result.stderr}"
    outcomes = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert sorted(outcomes) == sorted(CUDA_KERNELS)
    assert all(v in ("ValueError", "TypeError") for v in outcomes.values()), outcomes
