"""Every Triton kernel of the package, compiled ahead of time for the A100 (sm_80) and the H100 (sm_90)
on this CPU: each compiles, without register spills, within 255 registers per thread and within the
target's shared memory per block, and the attention products run on tensor cores (warp-group MMA on
sm_90, mma.sync on sm_80; fp32 inputs take the exact FMA path by contract, docs/OPS.md).

scripts/gpu_resources.py compiles every config each kernel lists for the target, at every dtype and
head dim or row width class the ops route to it (its docstring says which); this module checks its
every compile. Every kernel is hot (attention, token movement, adaLN), so a spill anywhere fails.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from enat_kernels import triton_utils

import helpers

pytestmark = helpers.needs_triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATTENTION = ("_attention_fwd_kernel", "_attention_bwd_kernel")


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Every compile of scripts/gpu_resources.py (a process pool of 2, as on CI's two cores)."""
    out = tmp_path_factory.mktemp("gpu_targets") / "compiles.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_resources.py"), "--json", str(out), "--jobs", "2"],
                   env=env, check=True, timeout=3600)
    report = json.loads(out.read_text())
    print(f"\n{len(report['results'])} compiles in {report['seconds']:.0f} s")
    return report["results"]


def _where(r):
    config = r["config"]
    label = "" if config is None else (f" config #{config['index']} {config['kwargs']} w{config['num_warps']}"
                                       f" s{config['num_stages']}")
    return f"{r['name']} {r['target']}{label} ({', '.join(r['cases'])})"


def _failures(compiles, bad):
    return [f"{_where(r)}: {bad(r)}" for r in compiles if r["error"] is None and bad(r)]


def _spills(r):
    return (r["spill_stores"] is None or r["spill_stores"] or r["spill_loads"]) and (
        f"spill stores {r['spill_stores']} B, loads {r['spill_loads']} B")


def test_every_kernel_compiles_for_both_targets(compiles):
    failed = [f"{_where(r)}: {r['error']}" for r in compiles if r["error"] is not None]
    assert not failed, "\n".join(failed)
    for target in triton_utils.SHARED_MEMORY_LIMIT:
        compiled = {r["name"] for r in compiles if r["target"] == target}
        assert compiled == set(triton_utils.kernels()), target


def test_no_register_spills(compiles):
    failures = _failures(compiles, _spills)
    assert not failures, "\n".join(failures)


def test_fp32_attention_is_compiled_up_to_head_dim_32():
    """fp32 attention on a GPU is refused above TRITON_FP32_MAX_D (its exact products spill there), so
    what this module compiles is every fp32 case the backend takes (meta tensors stand for GPU ones)."""
    A = sys.modules["enat_kernels.ops.asymmetric_attention"]
    for D, refused in ((A.TRITON_FP32_MAX_D, False), (A.TRITON_FP32_MAX_D + 1, True), (64, True)):
        q = torch.empty(2, 4, 8, D, device="meta")
        reasons = A._triton_forward_why_not(q, q, q, q, q, 0.1)
        assert bool(reasons) == refused and (not refused or "spill registers" in reasons[0]), (D, reasons)
        assert bool(A._triton_backward_why_not(q, q, q, q, q, q, q, q[..., 0], 0.1)) == refused, D
    assert not A._triton_forward_why_not(*[torch.empty(2, 4, 8, 64)] * 5, 0.1)  # the interpreter: CPU tensors


def test_registers_within_255(compiles):
    failures = _failures(compiles, lambda r: not 0 < (r["registers"] or 0) <= 255 and f"{r['registers']} registers")
    assert not failures, "\n".join(failures)


def test_shared_memory_within_the_target_limit(compiles):
    def over(r):
        limit = triton_utils.SHARED_MEMORY_LIMIT[r["target"]]
        return r["shared_memory"] > limit and f"{r['shared_memory']} B of shared memory, limit {limit} B"

    failures = _failures(compiles, over)
    assert not failures, "\n".join(failures)


def _dtype(r):
    return r["signature"]["q_ptr"].lstrip("*")


def _constexprs(r):
    names = list(r["signature"])  # the kernel's parameters, in order
    return {names[path[0]]: value for path, value in r["constexprs"]}


def test_attention_products_on_tensor_cores(compiles):
    """fp16 and bf16: every product is a warp-group MMA on sm_90 and an mma.sync on sm_80 (TTGIR and PTX
    agree); fp32: every product on FMA (exact fp32, no TF32)."""

    def wrong(r):
        if r["name"] not in ATTENTION:
            return None
        if _dtype(r) == "fp32":
            expected, ptx = {"fma"}, r["ptx_wgmma"] + r["ptx_mma_sync"] == 0
        elif r["target"] == "sm90":
            expected, ptx = {"wgmma"}, r["ptx_wgmma"] > 0 and r["ptx_mma_sync"] == 0
        else:
            expected, ptx = {"mma.sync"}, r["ptx_mma_sync"] > 0 and r["ptx_wgmma"] == 0
        ok = set(r["products"]) == expected and ptx
        return not ok and (f"{_dtype(r)} products {r['products']}, PTX wgmma {r['ptx_wgmma']}"
                           f" mma.sync {r['ptx_mma_sync']}")

    attention = [r for r in compiles if r["name"] in ATTENTION]
    assert {_dtype(r) for r in attention} == {"fp16", "bf16", "fp32"}
    failures = _failures(compiles, wrong)
    assert not failures, "\n".join(failures)


def test_fp32_attention_compiled_as_the_backend_routes_it(compiles):
    A = sys.modules["enat_kernels.ops.asymmetric_attention"]
    fp32 = [r for r in compiles if r["name"] in ATTENTION and _dtype(r) == "fp32"]
    assert fp32 and all(_constexprs(r)["BLOCK_D"] <= A.TRITON_FP32_MAX_D for r in fp32)
