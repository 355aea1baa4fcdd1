"""python -m enat_kernels (enat_kernels/__main__.py, enat_kernels/info.py): the report names every op and
backend; --check passes here, and fails (exit status 1) when a kernel is off by just beyond its budget;
bad flags are argparse errors. The check runs in-process on small shapes (the interpreter's cost)."""

import io
import struct
import subprocess
import sys

import pytest
import torch

import enat_kernels
from enat_kernels import BACKENDS, info, triton_utils
from enat_kernels.__main__ import main

import helpers

SMALL = {
    "attention": [((1, 2, 5, 7, 5, 61), "heads")],
    "tokens": [((2, 16, 24, 5), "strided")],
    "adaln": [((2, 3, 61), "strided")],
}
ATTENTION = sys.modules["enat_kernels.ops.asymmetric_attention"]
GATHER = sys.modules["enat_kernels.ops.gather_scatter"]


def test_report_names_every_op_and_backend():
    out = io.StringIO()
    info.report(out=out)
    text = out.getvalue()
    lines = text.splitlines()
    for op in enat_kernels.ops.__all__:
        rows = [i for i, line in enumerate(lines) if line.split()[:1] == [op]]
        assert len(rows) == 1, f"{op}: {len(rows)} rows"
        backends = [lines[rows[0] + k][22:33].strip() for k in range(len(BACKENDS))]
        assert sorted(backends) == sorted(BACKENDS), f"{op}: {backends}"
    assert torch.__version__ in text
    assert (enat_kernels.EXTENSION_ERROR or "loaded from") in text


def test_availability_matches_the_calls():
    """The report's answer for each op is what the call does: on this device the chosen backend serves."""
    table = info.availability(models=("ENAT-S",))
    assert set(table) == set(enat_kernels.ops.__all__)
    for op, per_model in table.items():
        e = per_model["ENAT-S"]
        assert set(e.reasons) == set(BACKENDS), op
        assert e.chosen in BACKENDS and e.reasons[e.chosen] == [], f"{op}: {e}"
        for backend, reasons in e.reasons.items():
            if backend == e.chosen:
                continue
            assert reasons or BACKENDS.index(backend) > BACKENDS.index(e.chosen), f"{op}: {e}"
        if not helpers.HAS_GPU:
            assert e.chosen in ("cpu", "reference") and e.reasons["cuda"], f"{op}: {e}"


def test_default_report_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "enat_kernels"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for op in enat_kernels.ops.__all__:
        assert f"\n{op} " in done.stdout


def test_check_passes_here():
    out = io.StringIO()
    rows, skipped = info.check(cases=SMALL, out=out)
    failed = [info.format_row(r) for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    checked = {(r.op, r.backend, r.step) for r in rows}
    runnable = ["reference"] + (["triton"] if triton_utils.triton is not None else [])
    for op, spec in info.OPS.items():
        for backend in runnable:
            assert (op, backend, "fwd") in checked, (op, backend)
            assert ((op, backend, "bwd") in checked) == bool(spec.grads), (op, backend)
    assert {r.dtype for r in rows} == {"float32", "bfloat16", "float16", "bool"}  # bool: mask_to_index
    if triton_utils.INTERPRET:
        assert any("bf16" in reason for reason in skipped)
    assert "FAIL" not in out.getvalue()


def _broken(monkeypatch, module, dispatcher, change):
    """Replace the Triton implementation of module.<dispatcher> by one whose result goes through change."""
    impls = getattr(module, dispatcher).impls
    good = impls["triton"]

    def run(*args, **kwargs):
        return change(good.run(*args, **kwargs))

    monkeypatch.setitem(impls, "triton", good._replace(run=run))


def _check_one(op, **kwargs):
    out = io.StringIO()
    status = info.run_check(out=out, ops=[op], backends=["triton"], dtypes=[torch.float32], cases=SMALL, **kwargs)
    return status, out.getvalue()


@helpers.needs_triton
def test_check_fails_just_beyond_the_attention_budget(monkeypatch):
    """One element of the Triton forward's output moved by the budget's margin: within it the check
    passes, a quarter beyond it (error + budget) it fails with exit status 1."""
    rows, _ = info.check(ops=["asymmetric_attention"], backends=["triton"], dtypes=[torch.float32], cases=SMALL,
                         out=io.StringIO())
    error, budget = rows[0].details["out"]
    assert rows[0].ok and error < budget

    def moved(by):
        def change(result):
            out, lse = result
            out = out.clone()
            out[(0,) * out.dim()] += by
            return out, lse
        return change

    _broken(monkeypatch, ATTENTION, "FORWARD", moved(0.5 * (budget - error)))
    status, text = _check_one("asymmetric_attention")
    assert status == 0, text
    _broken(monkeypatch, ATTENTION, "FORWARD", moved(1.25 * (budget + error)))
    status, text = _check_one("asymmetric_attention")
    assert status == 1
    fwd = next(line for line in text.splitlines() if " fwd " in line)
    assert fwd.endswith("FAIL") and " out " in fwd, text


@helpers.needs_triton
def test_check_fails_on_a_one_ulp_token_error(monkeypatch):
    """Token movement is exact: one element one ulp off fails."""
    def change(out):
        out = out.clone()
        first = (0,) * out.dim()
        out[first] = torch.nextafter(out[first], torch.tensor(float("inf"), dtype=out.dtype))
        return out

    _broken(monkeypatch, GATHER, "GATHER", change)
    status, text = _check_one("gather_tokens")
    assert status == 1
    assert "FAIL" in next(line for line in text.splitlines() if " fwd " in line), text


@pytest.mark.parametrize(("argv", "message"), [
    (["--nope"], "unrecognized arguments: --nope"),
    (["--check", "--bench"], "not allowed with argument"),
    (["check"], "unrecognized arguments: check"),
])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(helpers.HAS_GPU, reason="on a GPU --bench times every op (scripts/gpu_check.sh runs it)")
def test_bench_without_a_gpu_says_so(capsys):
    assert main(["--bench"]) == 0
    assert "has none, so nothing was timed" in capsys.readouterr().out


def _fatbin(entries):
    """A fat binary (the layout of the .nv_fatbin section) holding (kind, capability) entries of 8 bytes each."""
    body = b"".join(struct.pack("<HHIQ12xI32x", kind, 0, 64, 8, arch) + bytes(8) for kind, arch in entries)
    return struct.pack("<IHHQ", info.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_fatbin_archs():
    blob = _fatbin([(2, 80), (2, 90)]) + bytes(8) + _fatbin([(1, 90), (2, 80)])
    assert info._fatbin_archs(blob) == ([80, 90], [90])
    assert info._fatbin_archs(b"") == ([], [])


@pytest.mark.parametrize(("cubin", "ptx", "capability", "runs"), [
    ([80, 90], [], 90, True), ([80, 90], [], 86, True), ([80], [], 90, False), ([90], [], 80, False),
    ([80, 90], [], 100, False), ([80], [90], 100, True), ([], [90], 80, False),
])
def test_runs_on(cubin, ptx, capability, runs):
    assert info._runs_on({"cubin": cubin, "ptx": ptx}, capability) == runs


def test_extension_build():
    build = info.extension_build()
    if not enat_kernels.EXTENSION_LOADED:
        assert build == {"error": enat_kernels.EXTENSION_ERROR}
        return
    assert build["cubin"] or build["ptx"], build  # setup.py builds for at least one architecture
    assert all(30 <= c < 200 for c in build["cubin"] + build["ptx"]), build
    assert build["compiler"], build
