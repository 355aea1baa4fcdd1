"""Test session setup. Runs before any test module, so before triton is imported.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must
be in the environment before triton is imported (enat_kernels reads it once, and pins autotuning
to one config then). With a GPU, Triton compiles for it as usual.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import enat_kernels  # noqa: E402


def pytest_report_header(config):
    from enat_kernels import triton_utils

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    triton_mode = "not installed" if triton_utils.triton is None else (
        "interpreter (TRITON_INTERPRET=1)" if triton_utils.INTERPRET else f"compiled, triton {triton_utils.triton.__version__}"
    )
    ext = "loaded" if enat_kernels.EXTENSION_LOADED else f"absent: {enat_kernels.EXTENSION_ERROR}"
    return [f"enat_kernels: torch {torch.__version__}, GPU {gpu}, Triton {triton_mode}, CUDA extension {ext}"]


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    """Every test starts from seed 0 and without backend or debug switches from the caller's shell."""
    torch.manual_seed(0)
    monkeypatch.delenv("ENAT_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("ENAT_KERNELS_DEBUG", raising=False)
