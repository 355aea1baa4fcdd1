"""The CUDA kernels' fit on the GPUs, shown without one: scripts/cuda_resources.py compiles every kernel of
enat_kernels._C for sm_80 and sm_90 with nvcc, and what ptxas reports must meet the targets: no spills,
at most 255 registers, static + dynamic shared memory within one block's limit; the attention's
tensor-core kernels on mma.sync (HMMA in SASS) on both; the model's attention views on the pipelined
cp.async loader. Skipped where nvcc is not installed."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "scripts" / "cuda_resources.py")
cuda_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_resources)

NVCC = cuda_resources.find_tool("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found ($CUDA_HOME, PATH, /usr/local/cuda): "
                                                     "the CUDA kernels cannot be compiled here")

ARCHS = ("sm_80", "sm_90")
# Shared memory one block may use with the opt-in: 163 KiB on sm_80, 227 KiB on sm_90 (CUDA C++
# Programming Guide, technical specifications per compute capability).
SMEM_LIMIT = {"sm_80": 166_912, "sm_90": 232_448}
TC_SHAPES = ((32, 4), (64, 8), (64, 4), (96, 4), (128, 4))  # (D_PAD, warps)
TC_KERNELS = {f"attn_tc_kernel<{t}, {d}, {w}>": d for t in ("__half", "__nv_bfloat16") for d, w in TC_SHAPES}
OTHER_KERNELS = (
    {f"attn_simple_kernel<{t}>" for t in ("__half", "__nv_bfloat16", "float")}
    | {f"{k}<{w}>" for k in ("move_rows_kernel", "gather_rows_kernel") for w in (1, 2, 4, 8, 16)}
    | {"mask_to_index_kernel"}
)


@pytest.fixture(scope="module")
def resources():
    return cuda_resources.measure(archs=(80, 90), nvcc=NVCC)


def test_every_kernel_is_compiled_for_sm80_and_sm90(resources):
    assert set(resources["kernels"]) == set(TC_KERNELS) | OTHER_KERNELS
    for name, by_arch in resources["kernels"].items():
        assert set(by_arch) == set(ARCHS), name


def test_no_spills_registers_and_shared_memory_within_limits(resources):
    for name, by_arch in resources["kernels"].items():
        for arch, r in by_arch.items():
            where = f"{name} on {arch}: {r}"
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
            assert r["registers"] <= 255, where
            assert r["static_smem"] + r["dynamic_smem"] <= SMEM_LIMIT[arch], where
            # the block fits one SM's 64K registers
            assert r["registers"] * r["threads"] <= 65536, where


def test_tensor_core_kernels_run_mma_sync_on_both_architectures(resources):
    """Per key tile a warp issues D_PAD / 16 k-steps x 8 key n-tiles for S = Q K^T and 4 key k-steps x
    D_PAD / 8 column n-tiles for O += P V: D_PAD m16n8k16 MMAs, unrolled, so that many in the PTX."""
    for name, d_pad in TC_KERNELS.items():
        for arch in ARCHS:
            assert resources["kernels"][name][arch]["mma"] == d_pad, (name, arch)
    for name in OTHER_KERNELS:
        assert all(r["mma"] == 0 for r in resources["kernels"][name].values()), name


def test_mma_sync_becomes_hmma_in_the_sass(resources):
    if not resources["sass"]:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's) to disassemble the cubins")
    for name, d_pad in TC_KERNELS.items():
        for arch in ARCHS:
            assert resources["kernels"][name][arch]["hmma"] == d_pad, (name, arch)


def test_tensor_core_kernels_carry_the_cp_async_loader_of_every_width(resources):
    for name in TC_KERNELS:
        for arch in ARCHS:
            assert resources["kernels"][name][arch]["cp_async"] == [16, 8, 4], (name, arch)


def test_model_attention_views_take_the_pipelined_loader(resources):
    """Expected plans, from the alignment rules (2-byte elements, 64-byte aligned buffers):
    ENAT-S: rows of the fused (B, L, 3 * 366) projection are 2196 bytes apart (a multiple of 4, not 8)
    and heads 122 bytes apart, so q, k and v of head h start 2 * (h % 2) bytes past a 4-byte boundary,
    together: 4-byte copies, shift h % 2, 61 + 1 columns in D_PAD 64. ENAT-B (D 96) and ENAT-L (D 64):
    rows and heads 16-byte multiples: 16-byte copies into D_PAD 96 and 64. A contiguous (B, H, L, 61)
    tensor has rows 122 bytes apart, alternating between two 4-byte alignments: the element-wise
    loader."""
    plans = {label.split(" ")[0] if "model" in label else label: (w, d) for label, w, d in resources["plans"]}
    assert plans == {
        "ENAT-S": (4, 64), "ENAT-B": (16, 96), "ENAT-L": (16, 64),
        "contiguous (B, H, L, 61)": (2, 64), "contiguous (B, H, L, 64)": (16, 64),
    }


def test_the_table_covers_every_kernel_of_the_built_extension(resources):
    """The resource program compiles the kernel headers alone; the extension must hold no other kernel."""
    import enat_kernels

    libs = sorted((ROOT / "enat_kernels").glob("_C*.so"))
    cuobjdump = cuda_resources.find_cuobjdump()
    if not enat_kernels.EXTENSION_LOADED or not libs or cuobjdump is None:
        pytest.skip("needs the built extension and cuobjdump")
    listing = subprocess.run([cuobjdump, "-res-usage", str(libs[0])], capture_output=True, text=True, check=True)
    mangled = {line.split("Function ", 1)[1].rstrip(":") for line in listing.stdout.splitlines()
               if line.strip().startswith("Function ")}
    assert set(cuda_resources.demangle(mangled).values()) == set(resources["kernels"])
