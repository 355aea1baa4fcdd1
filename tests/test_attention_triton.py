"""The Triton attention kernels themselves: every autotuning configuration of every target (sm_80 and
sm_90 lists), every backward launch plan (one pass of the five products, (dV, dK) then dQ, one launch
per gradient), and
shapes that span several tiles in every dimension (ragged last tiles in both key segments, padded head
dims), against the fp64 oracle.

Runs on the GPU, or on CPU tensors in the Triton interpreter when there is no GPU.
"""

import sys

import pytest
import torch

import enat_kernels.ops  # noqa: F401  (loads the op modules)

import helpers
import oracle
from test_attention import NAMES, case_id, check_forward, make_inputs

pytestmark = helpers.needs_triton

A = sys.modules["enat_kernels.ops.asymmetric_attention"]
DEVICE = helpers.triton_device()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
if DEVICE == "cuda":
    DTYPES["bf16"] = torch.bfloat16
PASSES = {"one-pass": A.ONE_PASS, "kv-then-q": A.KV_THEN_Q, "per-gradient": A.PER_GRADIENT}


def check_gradients(grads, inputs, grad_out, scale, what):
    """Gradients of the five inputs against the oracle (budget factor 3, as in test_attention.py)."""
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = torch.autograd.grad(oracle.attention(*leaves64, scale=scale)[0], leaves64, grad_out.double())
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    naive = torch.autograd.grad(oracle.attention_same_dtype(*leaves, scale=scale), leaves, grad_out)
    scales = oracle.attention_error_scales(*inputs, grad_out=grad_out, scale=scale)
    for name, g, r, n, t in zip(NAMES, grads, ref, naive, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{what} d{name}: {g.dtype}{list(g.shape)}"
        assert not torch.isnan(g).any(), f"{what} d{name}: NaN"
        helpers.assert_within_budget(g, r, n, 3, what=f"{what} d{name}", scale=scales[name])


def run_both(inputs, scale, dtype, *, forward_config=None, backward_config=None, passes=None, what=""):
    """Forward and backward kernels called directly, checked against the oracle; the gradient of the
    output comes in the output's own layout, (B, Lq, H, D) memory, as autograd hands it over."""
    out, lse = A.asymmetric_attention_triton(*inputs, scale, config=forward_config)
    check_forward(out, lse, inputs, scale=scale, what=f"{what} forward")
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype=dtype, device=out.device)
    grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    grads = A.asymmetric_attention_backward_triton(grad_out, *inputs, out, lse, scale, config=backward_config,
                                                   passes=passes)
    check_gradients(grads, inputs, grad_out, scale, what)


def config_id(c):
    return "-".join(f"{k}{v}" for k, v in c.kwargs.items()) + f"-w{c.num_warps}-s{c.num_stages}"


# Several tiles in every dimension under the first (pinned) configuration: B, H > 1, Lq over three query
# tiles, Lc and Ls each over one full and one partial key tile, D padded (80 -> 128) or exact.
MULTI_TILE = [(2, 2, 140, 70, 80, 80), (2, 1, 130, 0, 140, 64), (1, 2, 129, 150, 0, 61)]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", MULTI_TILE, ids=case_id)
def test_multi_tile_forward_and_backward(shape, dtype):
    inputs = make_inputs(*shape, dtype=dtype, device=DEVICE)
    run_both(inputs, shape[-1] ** -0.5, dtype, what=case_id(shape))


@pytest.mark.parametrize("passes", list(PASSES.values()), ids=list(PASSES))
@pytest.mark.parametrize("shape", [(2, 2, 100, 37, 120, 61), (1, 3, 9, 0, 9, 64), (2, 1, 1, 80, 1, 16)], ids=case_id)
def test_every_backward_launch_plan(shape, passes):
    """Every launch plan gives the oracle's gradients."""
    inputs = make_inputs(*shape, dtype=torch.float32, device=DEVICE)
    run_both(inputs, 0.37, torch.float32, passes=passes, what=f"{case_id(shape)} {len(passes)} passes")


def test_negative_and_zero_scale_use_the_right_row_statistic():
    """A negative scale flips which raw score is the row maximum; zero makes every key equal."""
    inputs = make_inputs(1, 2, 70, 45, 90, 64, device=DEVICE)
    for scale in (-0.6, 0.0):
        run_both(inputs, scale, torch.float32, what=f"scale={scale}")


def _unique(configs):
    seen = []
    for c in configs:
        if not any(c is s for s in seen):
            seen.append(c)
    return seen


def _config_shape(block_m, block_n, D):
    """Two and a bit query tiles; a context of one full key tile and a bit, a self segment of a partial one."""
    return (1, 2, 2 * block_m + 3, block_n + 5, block_n - 3, D)


@pytest.mark.parametrize("D", [61, 64])
@pytest.mark.parametrize("config", _unique(A.FORWARD_CONFIGS) if A.triton else [], ids=config_id)
def test_every_forward_config(config, D):
    shape = _config_shape(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], D)
    inputs = make_inputs(*shape, dtype=torch.float16, device=DEVICE)
    out, lse = A.asymmetric_attention_triton(*inputs, D**-0.5, config=config)
    check_forward(out, lse, inputs, what=f"{config_id(config)} {case_id(shape)}")


@pytest.mark.parametrize("passes", list(PASSES.values()), ids=list(PASSES))
@pytest.mark.parametrize("D", [61, 64])
@pytest.mark.parametrize("config", _unique(A.BACKWARD_CONFIGS) if A.triton else [], ids=config_id)
def test_every_backward_config(config, D, passes):
    shape = _config_shape(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], D)
    inputs = make_inputs(*shape, dtype=torch.float16, device=DEVICE)
    run_both(inputs, D**-0.5, torch.float16, backward_config=config, passes=passes,
             what=f"{config_id(config)} {len(passes)} passes")


def test_every_target_lists_configs_of_the_kernel():
    """Each target's lists (what autotuning tries on that GPU) are drawn from the kernel's configs,
    which the tests above run one by one, and every backward plan is one of the plans they run."""
    for family in ("sm80", "sm90"):
        for precision in ("tf32", "ieee"):
            for block_d in (16, 32, 64, 128):
                listed = A._attention_fwd_kernel.configs_for(family, BLOCK_D=block_d, PRECISION=precision)
                assert listed and all(any(c is k for k in A.FORWARD_CONFIGS) for c in listed)
            for block_d in (16, 32, 64, 128) if precision == "ieee" else (64, 128):
                for aligned in (True, False):
                    plan = A.BACKWARD_PLANS[family, "fp32" if precision == "ieee" else "mma", block_d, aligned]
                    assert tuple(plan) in PASSES.values()
                    for products in plan:
                        flags = {name: name in products for name in ("dV", "dK", "dQ")}
                        listed = A._attention_bwd_kernel.configs_for(
                            family, BLOCK_D=block_d, PRECISION=precision, ALIGNED=aligned,
                            DV=flags["dV"], DK=flags["dK"], DQ=flags["dQ"])
                        assert listed and all(any(c is k for k in A.BACKWARD_CONFIGS) for c in listed)
