"""Shared test helpers: where each backend runs, awkward inputs, the error budget (the last two from
enat_kernels.testing, which `python -m enat_kernels --check` uses too)."""

import os
import subprocess
import sys

import pytest
import torch

from enat import ENATConfig
from enat_kernels import _library, backends, triton_utils
from enat_kernels.testing import INTERPRETED_BF16, assert_within_budget, heads_view, padded, strided  # noqa: F401

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU; this machine has none (CPU paths run here)")
needs_triton = pytest.mark.skipif(triton_utils.triton is None, reason="triton is not installed")
needs_cpu_kernels = pytest.mark.skipif(_library.CPU is None, reason=str(_library.CPU_ERROR))
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)  # what the cpu backend's kernels take


def triton_device():
    """Where Triton kernels run here: CPU tensors under the interpreter, else the GPU."""
    return "cpu" if triton_utils.INTERPRET else "cuda"


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(args, timeout=120):
    """`python ARGS` in the repository root (one OpenMP thread, Triton compiling as without the tests):
    the CompletedProcess, stdout and stderr as text."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# Model helpers.

TINY = ENATConfig("tiny", depth_enc=2, depth_dec=2, width=48, heads=3, resolution=80)  # L = 25, head dim 16
SMALL_S = ENATConfig("ENAT-S-64px", depth_enc=15, depth_dec=1, width=366, heads=6, resolution=64)  # head dim 61


def oracle_cfg(cfg):
    """The config dict enat_oracle takes."""
    return dict(depth_enc=cfg.depth_enc, depth_dec=cfg.depth_dec, width=cfg.width, heads=cfg.heads)


def perturbed(model_class, cfg, dtype=torch.float64, seed=0):
    """A model whose every parameter is random: LayerNorm weights near 1, the rest ~ N(0, 1/fan_in)."""
    model = model_class(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1 or name == "mlm_layer.bias":
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def replaced(inputs, changes):
    """(inputs, kwargs) for a bad-input case: each change to a name in `inputs` (a dict of valid tensors)
    replaces it (a callable is applied to the valid tensor), any other change is an extra keyword."""
    kwargs = {}
    for k, v in changes.items():
        if k in inputs:
            inputs[k] = v(inputs[k]) if callable(v) else v
        else:
            kwargs[k] = v
    return inputs, kwargs


def backend_device(backend):
    """The device whose tensors `backend` is tested on here (None: auto, on CPU tensors): the GPU where it
    runs on one, else the CPU (Triton's interpreter, the cpu kernels, the reference without a GPU)."""
    return "cpu" if backend is None else backends.device_for(backend) or "cpu"


def backend_params(names, dtypes):
    """pytest params of (backend, dtype) for the backends `names` (None: auto) and the named dtypes {id:
    dtype}, marked to skip where this machine cannot run them."""
    params = []
    for backend in names:
        for name, dtype in dtypes.items():
            marks = []
            if backend is not None and backends.device_for(backend) is None:
                why = backends.REGISTRY[backend].device_reasons(torch.device("cuda"), True)
                marks.append(pytest.mark.skip(reason=f"{backend} cannot run here: {'; '.join(why)}"))
            if backend == "cpu" and dtype not in CPU_KERNEL_DTYPES:
                marks.append(pytest.mark.skip(reason="the cpu backend takes fp32 and fp64 (tested to refuse others)"))
            if backend == "triton" and backend_device(backend) == "cpu" and dtype == torch.bfloat16:
                marks.append(pytest.mark.skip(reason=INTERPRETED_BF16))
            params.append(pytest.param(backend, dtype, marks=marks, id=f"{backend or 'auto'}-{name}"))
    return params
