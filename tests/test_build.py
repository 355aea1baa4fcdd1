"""setup.py's build switches, run as a user would run them (no compilation happens here)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_py(**env):
    return subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )


def _messages(result):
    return [line for line in result.stdout.splitlines() if line.startswith("enat_kernels:")]


def test_skipping_a_build_says_so_in_one_line():
    result = _setup_py(ENAT_KERNELS_BUILD_CUDA="0", ENAT_KERNELS_BUILD_CPU="0")
    assert result.returncode == 0, result.stderr
    assert _messages(result) == ["enat_kernels: CUDA backend skipped (ENAT_KERNELS_BUILD_CUDA=0)",
                                 "enat_kernels: CPU kernels skipped (ENAT_KERNELS_BUILD_CPU=0)"]


def test_the_cpu_kernels_build_without_the_cuda_extension():
    result = _setup_py(ENAT_KERNELS_BUILD_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert _messages(result)[0] == "enat_kernels: CUDA backend skipped (ENAT_KERNELS_BUILD_CUDA=0)"
    assert _messages(result)[1].startswith("enat_kernels: building enat_kernels._cpu with MAX_JOBS=")


@pytest.mark.parametrize("switch", ["ENAT_KERNELS_BUILD_CUDA", "ENAT_KERNELS_BUILD_CPU"])
def test_unknown_build_switch_is_an_error_naming_it(switch):
    result = _setup_py(**{switch: "yes"})
    assert result.returncode != 0
    assert f"{switch} must be 0, 1 or unset, got 'yes'" in result.stderr


def test_one_compiler_for_cpp_sources_and_nvcc_host():
    """torch compiles .cpp files with CXX and hands nvcc `-ccbin $CC` only when CC is set: a CXX given
    alone is used for both."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "ENAT_KERNELS_BUILD_CUDA")}
    result = subprocess.run(
        [sys.executable, "-c", "import runpy, os; runpy.run_path('setup.py'); print('CC=' + os.environ['CC'])",
         "--version"],
        cwd=ROOT, env={**env, "CXX": "g++"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    if "CUDA backend skipped" in result.stdout:
        pytest.skip(result.stdout.strip().splitlines()[0])
    compiler = shutil.which("g++")
    assert f"host compiler {compiler})" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"CC={compiler}"
