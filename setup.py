"""Build enat_kernels: the Python packages, the CPU kernels enat_kernels._cpu (csrc/cpu) and, when
possible, the CUDA extension enat_kernels._C (the rest of csrc/).

    pip install --no-build-isolation -e .

The CPU kernels are built wherever torch and a C++ compiler are; the CUDA extension when torch is a
CUDA build and nvcc is found (CUDA_HOME, nvcc on PATH, or /usr/local/cuda). Environment switches:

    ENAT_KERNELS_BUILD_CPU=0    do not build the CPU kernels (=1: build them or fail with the reason)
    ENAT_KERNELS_BUILD_CUDA=0   never build the CUDA extension
    ENAT_KERNELS_BUILD_CUDA=1   build it or fail with the reason
    TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "8.0;9.0")
    MAX_JOBS                    parallel compile jobs (default: bounded by cores and memory)
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0"
GIB_PER_JOB = 8  # nvcc on a translation unit that includes the torch headers
HIDDEN = ("-fvisibility=hidden", "-fvisibility-inlines-hidden")
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]  # scripts/cuda_resources.py compiles with these too


def _find_cuda_home():
    """The CUDA install folder (the parent of nvcc's bin/), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def _pip_cuda_include_dirs():
    """Header folders of the pip-installed CUDA libraries (nvidia/cu13/include and the like)."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


TORCH_MISSING = "torch is not installed (install it first and use --no-build-isolation)"


def _build_plan(switch_name, what, why_not):
    """(True, None) to build `what`, or (False, reason). The switch `switch_name` = 0 skips it, = 1 turns
    a reason to skip into an error; `why_not()` gives the reason it cannot be built, or None."""
    switch = os.environ.get(switch_name, "").strip()
    if switch not in ("", "0", "1"):
        raise SystemExit(f"{switch_name} must be 0, 1 or unset, got {switch!r}")
    if switch == "0":
        return False, f"{switch_name}=0"
    reason = why_not()
    if reason is None:
        return True, None
    if switch == "1":
        raise SystemExit(f"{switch_name}=1 but {what} cannot be built: {reason}")
    return False, reason


def _cuda_why_not():
    """Why the CUDA extension cannot be built here, or None (then CUDA_HOME is set)."""
    try:
        import torch
    except ImportError:
        return TORCH_MISSING
    cuda_home = _find_cuda_home()
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        return "nvcc was not found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = cuda_home
    return None


def _cpu_why_not():
    """Why the CPU kernels cannot be built here, or None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return TORCH_MISSING
    host = _set_host_compiler()
    return None if shutil.which(host) else f"no C++ compiler ({host})"


def _default_max_jobs():
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 16
    return max(1, min(os.cpu_count() or 1, int(mem_gib // GIB_PER_JOB)))


def _set_host_compiler():
    """One C++ compiler for the C++ sources and as nvcc's host compiler: torch compiles .cpp files with
    CXX (default c++) but passes -ccbin to nvcc only when CC is set, so a CC or CXX given alone is
    used for both, and with neither, both are set to c++. Returns the compiler's path."""
    cxx = os.environ.get("CXX") or os.environ.get("CC") or "c++"
    path = shutil.which(cxx) or cxx
    os.environ.setdefault("CXX", path)
    os.environ.setdefault("CC", path)
    return path


def _cpu_extension():
    """The CPU kernels' extension, or None (with the reason printed)."""
    build, reason = _build_plan("ENAT_KERNELS_BUILD_CPU", "the CPU kernels", _cpu_why_not)
    if not build:
        print(f"enat_kernels: CPU kernels skipped ({reason})")
        return None
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(name="enat_kernels._cpu", sources=["csrc/cpu/kernels.cpp"], extra_compile_args=["-O3", *HIDDEN])


def _cuda_extension():
    """The CUDA extension, or None (with the reason printed)."""
    build, reason = _build_plan("ENAT_KERNELS_BUILD_CUDA", "the CUDA extension", _cuda_why_not)
    if not build:
        print(f"enat_kernels: CUDA backend skipped ({reason})")
        return None
    from torch.utils.cpp_extension import CUDAExtension

    host = _set_host_compiler()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp") if "cpu" not in p.parts)
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    ext = CUDAExtension(
        name="enat_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")] + _pip_cuda_include_dirs(),
        define_macros=[("ENAT_KERNELS_PYTHON_MODULE", None)],
        # Hidden visibility: the module exports PyInit__C only, so no inline (template) code compiled
        # from these headers can interpose on, or be interposed by, another library's copy.
        extra_compile_args={
            "cxx": ["-O3", *HIDDEN],
            "nvcc": [*NVCC_FLAGS, *(f"-Xcompiler={flag}" for flag in HIDDEN)],
        },
    )
    print(
        f"enat_kernels: building the CUDA backend for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"(CUDA_HOME={os.environ['CUDA_HOME']}, host compiler {host})"
    )
    return ext


def _extension_kwargs():
    cuda = _cuda_extension()  # first: it sets CUDA_HOME, which torch.utils.cpp_extension reads on import
    extensions = [e for e in (_cpu_extension(), cuda) if e is not None]
    if not extensions:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    print(f"enat_kernels: building {', '.join(e.name for e in extensions)} with MAX_JOBS={os.environ['MAX_JOBS']}")
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="enat_kernels",
    version="0.1.0",
    description="Triton and CUDA kernels for ENAT-style non-autoregressive image generators",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["enat_kernels", "enat_kernels.*", "enat", "enat.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "tqdm", "Pillow"],
    extras_require={"test": ["pytest", "pytest-benchmark", "einops"],
                    "eval": ["pytorch-fid", "scipy"]},  # python -m enat.evaluate (pytorch-fid brings torchvision)
    zip_safe=False,
    **_extension_kwargs(),
)
