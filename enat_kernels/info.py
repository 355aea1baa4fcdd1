"""What runs here, and whether it is right: `python -m enat_kernels` (enat_kernels/__main__.py).

- `report()`: versions, the CUDA extension's build (compiler, GPU architectures), the device, Triton's
  mode, and for each op which backend serves the model's calls and why each other one does not
  (`enat_kernels.explain`), at ENAT-L's and ENAT-S's shapes (head dims 64 and 61, widths 1024 and
  366; bf16 on a GPU, fp32 on a CPU; attention inputs as heads of a projection, adaLN rows as column
  views).
- `check()`: every op on every backend that can run here, forward and backward, in fp32, bf16 and
  fp16, at a few shapes (several tiles, ENAT-S's head dim and width, strided and padded views),
  against plain PyTorch in float64 within the tests' error budgets (enat_kernels.testing): attention
  and adaLN by the FlashAttention rule, token movement exactly. Triton runs on a GPU, or on CPU
  tensors when TRITON_INTERPRET=1 was set before triton was imported (bf16 is left out there).
- `bench()`: GPU time of each op beside the PyTorch calls it replaces, at the calls of an 8-step
  ENAT-L generation at 256 px (batch 256 rows, bf16).
"""

import os
import platform
import re
import struct
import sys
import time
from typing import Callable, NamedTuple, Optional

import numpy
import torch
import torch.nn.functional as F

import enat_kernels
import enat_kernels.ops as K

from . import _library, triton_utils
from .backends import REGISTRY, ENV_BACKEND, BackendUnavailableError, device_for, explain
from .testing import (INTERPRETED_BF16, adaln_error_scales, attention_error_scales, error_budget, heads_view,
                      max_error, padded, strided)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-6  # the ops' default eps, as the model uses it
STEPS = 8  # generation steps of the model shapes


def _name(dtype):
    return str(dtype).removeprefix("torch.")


# The ops: how each is called, what plain PyTorch computes in its place, and its error budget.


def _rows(index, D):
    return index[..., None].expand(-1, -1, D)


def _by_mask(mask):
    """(B, L) positions: the visible ones (mask False), then the masked ones, each ascending."""
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)


def _attention_torch(q, k_ctx, v_ctx, k_self, v_self):
    """Concatenate, matmul, softmax, matmul in the inputs' dtype (in float64: the reference)."""
    k, v = torch.cat([k_ctx, k_self], 2), torch.cat([v_ctx, v_self], 2)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return {"out": s.softmax(-1) @ v, "lse": s.logsumexp(-1)}


def _adaln_torch(x, shift, scale):
    return {"out": F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale[:, None]) + shift[:, None]}


def _residual_adaln_torch(x, y, gate, shift, scale):
    x_new = x + gate[:, None] * y
    return {"x_new": x_new, **_adaln_torch(x_new, shift, scale)}


def _split_torch(x, mask, n_masked):
    rows = torch.gather(x, 1, _rows(_by_mask(mask), x.shape[2]))
    return {"visible": rows[:, : x.shape[1] - n_masked], "masked": rows[:, x.shape[1] - n_masked:]}


def _restore_torch(visible, masked, mask):
    src = torch.cat([visible, masked], 1)
    return {"out": src.new_zeros((*mask.shape, src.shape[2])).scatter(1, _rows(_by_mask(mask), src.shape[2]), src)}


def _merge_torch(fresh, fresh_index, cached, cached_index):
    rank = torch.argsort(torch.cat([fresh_index, cached_index], 1), dim=1)
    return {"out": torch.gather(torch.cat([fresh, cached], 1), 1, _rows(rank, fresh.shape[2]))}


class Op(NamedTuple):
    """How the report, the check and the benchmark call one public op."""

    fn: Callable  # the public op
    kind: str  # "attention", "tokens" or "adaln": which inputs (`make_inputs`)
    args: Callable  # inputs -> {name: argument}, the op's positional arguments in order
    outputs: tuple  # names of its results
    grads: tuple  # arguments that get gradients (none: no backward)
    pytorch: Callable  # (**arguments) -> {output: tensor}: plain PyTorch, differentiable
    scales: Optional[Callable] = None  # (arguments, output gradients) -> {name: magnitude}; None: exact
    kwargs: tuple = ()  # keyword arguments of the call, as (name, value) pairs
    floats: bool = True  # whether it takes float tensors (else it is checked in one dtype, labelled bool)


_ATTENTION = ("q", "k_ctx", "v_ctx", "k_self", "v_self")
_ADALN = ("x", "shift", "scale")
_RESIDUAL = ("x", "y", "gate", "shift", "scale")


def _pick(*names):
    """inputs -> {argument: input}, in the order given; "base=x" takes argument base from input x."""
    pairs = [(n.split("=")[0], n.split("=")[-1]) for n in names]
    return lambda t: {a: t[n] for a, n in pairs}


OPS = {
    "asymmetric_attention": Op(
        K.asymmetric_attention, "attention", _pick(*_ATTENTION), ("out", "lse"), _ATTENTION, _attention_torch,
        lambda a, g: attention_error_scales(*(a[n] for n in _ATTENTION), grad_out=g.get("out")),
        (("return_lse", True),)),
    "mask_to_index": Op(
        K.mask_to_index, "tokens", _pick("mask", "count=n"), ("index",), (),
        lambda mask, count: {"index": torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]},
        floats=False),
    "gather_tokens": Op(
        K.gather_tokens, "tokens", _pick("x", "index"), ("out",), ("x",),
        lambda x, index: {"out": torch.gather(x, 1, _rows(index, x.shape[2]))}),
    "scatter_tokens": Op(
        K.scatter_tokens, "tokens", _pick("base=x", "index", "src=rows"), ("out",), ("base", "src"),
        lambda base, index, src: {"out": base.scatter(1, _rows(index, base.shape[2]), src)}),
    "scatter_tokens_": Op(
        K.scatter_tokens_, "tokens", _pick("base=x", "index", "src=rows"), ("out",), (),
        lambda base, index, src: {"out": base.scatter_(1, _rows(index, base.shape[2]), src)}),
    "split_tokens": Op(
        K.split_tokens, "tokens", _pick("x", "mask", "n_masked=n"), ("visible", "masked"), ("x",), _split_torch),
    "restore_tokens": Op(
        K.restore_tokens, "tokens", _pick("visible=others", "masked=rows", "mask"), ("out",), ("visible", "masked"),
        _restore_torch),
    "merge_cache": Op(
        K.merge_cache, "tokens", _pick("fresh=rows", "fresh_index=index", "cached=others", "cached_index=others_index"),
        ("out",), ("fresh", "cached"), _merge_torch),
    "adaln": Op(
        K.adaln, "adaln", _pick(*_ADALN), ("out",), _ADALN, _adaln_torch,
        lambda a, g: adaln_error_scales(*(a[n] for n in _ADALN), grad_out=g.get("out"))),
    "residual_adaln": Op(
        K.residual_adaln, "adaln", _pick(*_RESIDUAL), ("x_new", "out"), _RESIDUAL, _residual_adaln_torch,
        lambda a, g: adaln_error_scales(a["x"], a["shift"], a["scale"], y=a["y"], gate=a["gate"],
                                        grad_out=g.get("out"), grad_x_new=g.get("x_new"))),
}

LAYOUTS = {"contiguous": lambda t: t, "padded": padded, "strided": strided, "heads": heads_view}


def make_inputs(kind, dims, dtype, device, generator):
    """The inputs of the ops of `kind`, contiguous, floats drawn in float64 and rounded to `dtype`.

    attention, dims (B, H, Lq, Lc, Ls, D): q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D); k_self,
    v_self (B, H, Ls, D). tokens, dims (B, L, D, n): x (B, L, D); mask (B, L) with n True per row;
    index (B, n) and others_index (B, L - n) its True and False positions; rows (B, n, D), others
    (B, L - n, D); n. adaln, dims (B, L, d): x, y (B, L, d); gate, shift, scale (B, d)."""

    def randn(*shape, mul=1.0, add=0.0):
        return (torch.randn(shape, dtype=torch.float64, generator=generator) * mul + add).to(dtype=dtype, device=device)

    if kind == "attention":
        B, H, Lq, Lc, Ls, D = dims
        return {n: randn(B, H, length, D) for n, length in zip(_ATTENTION, (Lq, Lc, Lc, Ls, Ls))}
    if kind == "adaln":
        B, L, d = dims
        return dict(x=randn(B, L, d, add=0.5), y=randn(B, L, d), gate=randn(B, d), shift=randn(B, d),
                    scale=randn(B, d, mul=0.5))
    B, L, D, n = dims
    mask = (torch.rand(B, L, generator=generator).argsort(dim=1) < n).to(device)
    order = _by_mask(mask)
    return dict(x=randn(B, L, D), mask=mask, index=order[:, L - n:], others_index=order[:, : L - n],
                rows=randn(B, n, D), others=randn(B, L - n, D), n=n)


def _arguments(op, inputs, layout, leaves=False):
    """The op's arguments, each tensor copied into `layout`; with `leaves`, those that get gradients
    are leaves that require them."""
    args = OPS[op].args(inputs)
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            value = LAYOUTS[layout](value)
            args[name] = value.detach().requires_grad_() if leaves and name in OPS[op].grads else value
    return args


def _call(op, args, backend=None):
    """{output name: result} of the op on `args`."""
    result = OPS[op].fn(*args.values(), backend=backend, **dict(OPS[op].kwargs))
    return dict(zip(OPS[op].outputs, result if isinstance(result, tuple) else (result,)))


# Versions, build and device.


def _elf_sections(data):
    """{name: bytes} of the sections of a 64-bit little-endian ELF image."""
    offset, = struct.unpack_from("<Q", data, 0x28)
    size, count, names = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<I20xQQ", data, offset + i * size) for i in range(count)]
    strings = data[headers[names][1]:headers[names][1] + headers[names][2]]
    return {strings[n:strings.index(b"\0", n)].decode(): data[o:o + s] for n, o, s in headers}


FATBIN_MAGIC = 0xBA55ED50


def _fatbin_archs(blob):
    """(cubin, PTX) compute capabilities (80 for sm_80) of the fat binaries in a .nv_fatbin section."""
    found = {1: set(), 2: set()}  # entry kind: 1 PTX, 2 ELF (cubin)
    pos = 0
    while pos + 16 <= len(blob):
        magic, _, header, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries start 8-byte aligned
            continue
        entry, end = pos + header, pos + header + size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            found.setdefault(kind, set()).add(struct.unpack_from("<I", blob, entry + 28)[0])
            if entry_header == 0:
                break
            entry += entry_header + payload
        pos = end
    return sorted(found[2]), sorted(found[1])


def extension_build():
    """What built enat_kernels._C, read from the loaded file: {"file", "compiler", "toolkit", "cubin",
    "ptx"} (cubin, ptx: compute capabilities such as 90), or {"error": why} if it is not loaded."""
    if not _library.EXTENSION_LOADED:
        return {"error": _library.EXTENSION_ERROR}
    path = sys.modules["enat_kernels._C"].__file__
    with open(path, "rb") as f:
        data = f.read()
    sections = _elf_sections(data)
    fatbin = sections.get(".nv_fatbin", b"")
    toolkit = re.search(rb"Cuda compilation tools, release [\d.]+, V[\d.]+", fatbin)
    cubin, ptx = _fatbin_archs(fatbin)
    return {"file": path,
            "compiler": "; ".join(sorted({c.decode() for c in sections.get(".comment", b"").split(b"\0") if c})),
            "toolkit": toolkit.group().decode() if toolkit else None, "cubin": cubin, "ptx": ptx}


def _runs_on(build, capability):
    """Whether the extension holds code for a GPU of compute capability `capability` (90 for sm_90):
    a cubin of the same major version and no newer minor one, or PTX it can compile."""
    return (any(c // 10 == capability // 10 and c <= capability for c in build["cubin"])
            or any(p <= capability for p in build["ptx"]))


def device_description():
    """The GPU (name, compute capability, memory, SMs), or the CPU when there is none."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                f"{p.multi_processor_count} SMs ({torch.cuda.device_count()} GPU(s) visible)")
    return f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads): no CUDA GPU"


def triton_mode():
    if triton_utils.triton is None:
        return f"not installed ({triton_utils.IMPORT_ERROR})"
    if triton_utils.INTERPRET:
        return "interpreter (TRITON_INTERPRET=1): Triton kernels run on CPU tensors when backend='triton' is forced"
    return "compiled for the GPU" + ("" if torch.cuda.is_available() else " (no GPU here: Triton kernels cannot run; "
                                     "TRITON_INTERPRET=1 before importing enat_kernels runs them on CPU tensors)")


def versions():
    """[(what, version)] of Python, the libraries and the extensions."""
    triton = triton_utils.triton
    build = extension_build()
    rows = [
        ("enat_kernels", enat_kernels.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA runtime {torch.version.cuda or 'none: CPU-only build'})"),
        ("triton", triton.__version__ if triton is not None else "not installed"),
        ("numpy", numpy.__version__),
        ("enat_kernels._cpu", f"loaded from {_library.CPU.__file__}" if _library.CPU is not None
         else f"not loaded: {_library.CPU_ERROR}"),
    ]
    if "error" in build:
        return rows + [("enat_kernels._C", f"not loaded: {build['error']}")]
    archs = ", ".join([f"sm_{c}" for c in build["cubin"]] + [f"PTX compute_{p}" for p in build["ptx"]]) or "none found"
    rows += [("enat_kernels._C", f"loaded from {build['file']}"), ("  built by", build["compiler"] or "not recorded"),
             ("  CUDA toolkit", build["toolkit"] or "not recorded"), ("  GPU code", archs)]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        rows.append(("  for this GPU", "yes" if _runs_on(build, 10 * major + minor)
                     else f"NO: no code for sm_{major}{minor} (rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})"))
    return rows


# The report: which backend serves the model's calls.

REPORT_LAYOUTS = {"attention": "heads", "tokens": "contiguous", "adaln": "strided"}


def model_dims(name, batch=2, step=STEPS // 2):
    """{kind: dims} of the model `name`'s calls at 256 px, mid-generation (step `step` of STEPS): the
    decoder's attention over n [MASK] tokens, token movement and adaLN of its rows."""
    from enat.config import config
    from enat.schedule import mask_schedule

    cfg = config(name)
    L = cfg.seq_len
    n = mask_schedule(L, STEPS)[step]
    return {"attention": (batch, cfg.heads, n, L - n, n, cfg.head_dim), "tokens": (batch, L, cfg.width, n),
            "adaln": (batch, n, cfg.width)}


def availability(models=("ENAT-L", "ENAT-S")):
    """{op: {model: Explanation}} for each op at each model's shapes, on the GPU in bf16 (on the CPU
    in fp32 when there is none), with the layouts of REPORT_LAYOUTS."""
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    generator = torch.Generator().manual_seed(0)
    table = {op: {} for op in OPS}
    for model in models:
        for kind, dims in model_dims(model).items():
            inputs = make_inputs(kind, dims, dtype, device, generator)
            for op, spec in OPS.items():
                if spec.kind == kind:
                    args = _arguments(op, inputs, REPORT_LAYOUTS[kind])
                    table[op][model] = explain(spec.fn, *args.values(), **dict(spec.kwargs))
    return table


def report(out=None):
    """Print versions, build, device, Triton's mode and the backends that serve each op."""
    out = out or sys.stdout
    width = 18
    for what, value in versions():
        print(f"{what:<{width}}{value}", file=out)
    print(f"{'device':<{width}}{device_description()}", file=out)
    print(f"{'triton mode':<{width}}{triton_mode()}", file=out)
    env = {v: os.environ.get(v)
           for v in ("TRITON_INTERPRET", ENV_BACKEND, "ENAT_KERNELS_AUTOTUNE", "ENAT_KERNELS_DEBUG")}
    print(f"{'environment':<{width}}" + (", ".join(f"{k}={v}" for k, v in env.items() if v is not None) or "none set"),
          file=out)

    models = ("ENAT-L", "ENAT-S")
    table = availability(models)
    dtype = "bf16 on the GPU" if torch.cuda.is_available() else "fp32 on the CPU"
    print(f"\nBackends at the model's shapes ({dtype}, 256 px, decoder step {STEPS // 2} of {STEPS}; "
          "ENAT-L: head dim 64, width 1024; ENAT-S: head dim 61, width 366). 'runs' marks the backend a call "
          "takes; numbers are the reasons below.", file=out)
    notes = []
    print(f"{'op':<22}{'backend':<11}" + "".join(f"{m:<12}" for m in models), file=out)
    for op, per_model in table.items():
        for i, backend in enumerate(per_model[models[0]].reasons):
            cells = []
            for model in models:
                e = per_model[model]
                reasons = e.reasons[backend]
                if not reasons:
                    cells.append("runs" if e.chosen == backend else "can serve")
                    continue
                numbers = []
                for r in reasons:
                    if r not in notes:
                        notes.append(r)
                    numbers.append(str(notes.index(r) + 1))
                cells.append("no (" + ",".join(numbers) + ")")
            print((f"{op if i == 0 else '':<22}{backend:<11}" + "".join(f"{c:<12}" for c in cells)).rstrip(), file=out)
    for i, note in enumerate(notes):
        print(f"  ({i + 1}) {note}", file=out)
    print("A backward runs on its forward's backend where that backend has one (the CUDA attention forward hands "
          "over to Triton's backward).", file=out)


# The check.

# {kind: [(dims, layout)]}: ENAT-S's head dim 61 and width 366 in the views the model passes, and shapes of
# several tiles (query and key tiles of attention, row tiles of the token and adaLN kernels); the first
# attention case is small enough for the CPU kernel (a backend stops at the first case it cannot serve).
CHECK_CASES = {
    "attention": [((2, 2, 16, 10, 16, 16), "heads"), ((2, 2, 24, 50, 24, 61), "heads"),
                  ((1, 2, 136, 100, 36, 64), "padded")],
    "tokens": [((2, 64, 366, 45), "strided"), ((2, 256, 64, 181), "padded")],
    "adaln": [((2, 13, 366), "strided"), ((2, 300, 64), "padded")],
}
DIM_NAMES = {"attention": ("B", "H", "Lq", "Lc", "Ls", "D"), "tokens": ("B", "L", "D", "n"), "adaln": ("B", "L", "d")}


def describe(kind, dims, layout):
    return " ".join(f"{n}{d}" for n, d in zip(DIM_NAMES[kind], dims)) + f" {layout}"


class Row(NamedTuple):
    """One line of the check: the result with the largest error for its budget (`worst`), and
    `details` {result: (error, budget)} for every result ({"error": message} when the op raised);
    `ok` when each error is within its budget."""

    op: str
    backend: str
    dtype: str
    shape: str
    step: str  # "fwd" or "bwd"
    worst: str
    error: float
    budget: float  # 0 for token movement: exact
    ok: bool
    details: dict


def _compare(results, refs, bases, factor, scales):
    """{name: (error, budget)}: each result against its float64 reference, with the budget of `factor`
    over the same-dtype PyTorch result (`bases`); exact when `scales` is None."""
    details = {}
    for name, ours in results.items():
        ref = refs[name]
        if ours.shape != ref.shape:
            details[name] = (float("inf"), 0.0)
        elif scales is None:
            details[name] = (max_error(ours, ref), 0.0)
        else:
            details[name] = error_budget(ours, ref, bases[name], factor, scale=scales[name])
    return details


def _row(op, backend, dtype, shape, step, details):
    def ratio(item):
        error, budget = item[1]
        return error / budget if budget else (float("inf") if error else 0.0)

    # The largest error for its budget; NaN (ratio != ratio) above all.
    worst, (error, budget) = max(details.items(), key=lambda item: (ratio(item) != ratio(item), ratio(item)))
    ok = all(e <= b for e, b in details.values())
    return Row(op, backend, _name(dtype) if OPS[op].floats else "bool", shape, step, worst, error, budget, ok, details)


def _float64(args, grads):
    """Float64 copies of the float tensors in args (leaves for those in `grads`), others as they are."""
    copies = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(torch.float64, copy=True).requires_grad_(name in grads)
        copies[name] = value
    return copies


def _same_dtype(args, grads):
    return {n: v.detach().clone().requires_grad_(n in grads) if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v for n, v in args.items()}


def _grad(outputs, leaves, grads_out):
    names = list(grads_out)
    return dict(zip(leaves, torch.autograd.grad([outputs[n] for n in names], list(leaves.values()),
                                                [grads_out[n] for n in names])))


def check_case(op, backend, dtype, device, dims, layout, generator):
    """[forward Row, backward Row (ops with gradients)] of `op` on `backend` in `dtype` on `device`."""
    spec = OPS[op]
    shape = describe(spec.kind, dims, layout)
    args = _arguments(op, make_inputs(spec.kind, dims, dtype, device, generator), layout, leaves=True)
    ref_args, base_args = _float64(args, spec.grads), _same_dtype(args, spec.grads)
    refs = spec.pytorch(**ref_args)  # before the op runs: scatter_tokens_ changes its base
    bases = spec.pytorch(**base_args) if spec.scales else None  # the budget's same-dtype PyTorch results
    results = _call(op, args, backend)
    rows = [_row(op, backend, dtype, shape, "fwd", _compare(
        results, refs, bases, 2, spec.scales(args, {}) if spec.scales else None))]
    if spec.grads:
        grads_out = {n: torch.randn(results[n].shape, dtype=torch.float64, generator=generator).to(dtype=dtype,
                                                                                                    device=device)
                     for n in spec.outputs if results[n].requires_grad}  # not lse
        ours = _grad(results, {n: args[n] for n in spec.grads}, grads_out)
        refs = _grad(refs, {n: ref_args[n] for n in spec.grads}, {n: g.double() for n, g in grads_out.items()})
        bases = _grad(bases, {n: base_args[n] for n in spec.grads}, grads_out) if spec.scales else None
        rows.append(_row(op, backend, dtype, shape, "bwd", _compare(
            ours, refs, bases, 3, spec.scales(args, grads_out) if spec.scales else None)))
    return rows




HEADER = (f"{'op':<22}{'backend':<11}{'dtype':<10}{'shape':<36}{'pass':<6}{'worst':<9}{'max error':>11}"
          f"{'budget':>11}  result")


def format_row(r):
    budget = f"{r.budget:>11.2e}" if r.budget else f"{'exact':>11}"
    return (f"{r.op:<22}{r.backend:<11}{r.dtype:<10}{r.shape:<36}{r.step:<6}{r.worst:<9}{r.error:>11.2e}{budget}  "
            f"{'ok' if r.ok else 'FAIL'}")


def check(ops=tuple(OPS), backends=None, dtypes=DTYPES, cases=None, out=None, seed=0):
    """Check each op of `ops` on each backend of `backends` (default: every registered one) that can run
    here, in each of `dtypes`, at `cases` ({kind: [(dims, layout)]}, default CHECK_CASES), printing a
    table row per pass as it goes and, last, what was not checked and why. Returns (rows, skipped
    {reason: [where]})."""
    out = out or sys.stdout
    cases = cases or CHECK_CASES
    backends = backends or tuple(REGISTRY)
    generator = torch.Generator().manual_seed(seed)
    rows, skipped = [], {}
    print(HEADER, file=out)
    for op in ops:
        for backend in backends:
            device = device_for(backend) or "cpu"  # where it cannot run: its reasons
            for dtype in dtypes if OPS[op].floats else dtypes[:1]:
                if backend == "triton" and triton_utils.INTERPRET and dtype == torch.bfloat16:
                    skipped.setdefault(f"triton bf16: {INTERPRETED_BF16}", []).append(op)
                    continue
                for dims, layout in cases[OPS[op].kind]:
                    try:
                        new = check_case(op, backend, dtype, device, dims, layout, generator)
                    except BackendUnavailableError as e:
                        reasons = str(e).split("\n  - ")[1:]
                        skipped.setdefault(f"{backend}: " + "; ".join(reasons), []).append(op)
                        break
                    except Exception as e:  # a kernel that raises fails its row, and the check goes on
                        shape = describe(OPS[op].kind, dims, layout)
                        new = [Row(op, backend, _name(dtype), shape, "run", type(e).__name__, float("nan"), 0.0,
                                   False, {"error": f"{type(e).__name__}: {e}"})]
                    for r in new:
                        print(format_row(r), file=out, flush=True)
                        if "error" in r.details:
                            print(f"    {r.details['error']}", file=out)
                    rows += new
    if skipped:
        print("\nNot checked here:", file=out)
        for reason, where in skipped.items():
            print(f"  {reason} ({', '.join(dict.fromkeys(where))})", file=out)
    return rows, skipped


def run_check(out=None, **kwargs):
    """check(**kwargs) with its summary line; the exit status: 0 when every row is ok, 1 otherwise."""
    out = out or sys.stdout
    start = time.perf_counter()
    print("Each op against plain PyTorch in float64: attention and adaLN within 2x (forward) / 3x "
          "(gradients) the same-dtype PyTorch error plus the ulp floor (enat_kernels.testing); token movement "
          f"exact. Device: {device_description()}; Triton: {triton_mode()}.\n", file=out)
    rows, _ = check(out=out, **kwargs)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} passes within budget, {len(failed)} FAILED "
          f"({time.perf_counter() - start:.0f} s)", file=out)
    return 1 if failed or not rows else 0


# The benchmark.

BENCH_MODEL = "ENAT-L"
BENCH_BATCH = 256  # rows: 128 images and their guidance rows
BENCH_DTYPE = torch.bfloat16


def bench_shapes():
    """[(op kind, dims, role)] of an 8-step ENAT-L generation at 256 px (enat.schedule): every attention
    call, the adaLN rows of each, and token movement at each step's [MASK] count."""
    from enat.config import config
    from enat.schedule import attention_shapes, mask_schedule

    cfg = config(BENCH_MODEL)
    L = cfg.seq_len
    shapes = []
    for role, Lq, Lc, Ls in attention_shapes(L, STEPS):
        shapes.append(("attention", (BENCH_BATCH, cfg.heads, Lq, Lc, Ls, cfg.head_dim), role))
        shapes.append(("adaln", (BENCH_BATCH, Lq, cfg.width), role))
    for k, n in enumerate(mask_schedule(L, STEPS)[1:-1], start=1):
        shapes.append(("tokens", (BENCH_BATCH, L, cfg.width, n), f"k{k}"))
    return shapes


def _baselines(op, args):
    """{name: fn} of the PyTorch calls the op replaces, on the op's arguments."""
    if op != "asymmetric_attention":
        return {"torch": lambda: OPS[op].pytorch(**args)}
    q, k_ctx, v_ctx, k_self, v_self = args.values()
    k, v = torch.cat([k_ctx, k_self], 2), torch.cat([v_ctx, v_self], 2)
    return {"cat+sdpa": lambda: F.scaled_dot_product_attention(q, torch.cat([k_ctx, k_self], 2),
                                                                torch.cat([v_ctx, v_self], 2)),
            "sdpa (K/V joined)": lambda: F.scaled_dot_product_attention(q, k, v)}


def gpu_time(fn):
    """Median GPU time of one call of fn, in seconds (triton.testing.do_bench: CUDA events around each
    call, L2 flushed before it), after one call that compiles and tunes."""
    from triton import testing

    fn()
    torch.cuda.synchronize()
    return testing.do_bench(fn, warmup=5, rep=25, quantiles=[0.5])[0] * 1e-3


def bench(out=None):
    """Print the GPU time of each op (its auto-chosen backend) and of the PyTorch calls it replaces at the
    generation's shapes; returns the exit status (0; on a CPU nothing is timed)."""
    out = out or sys.stdout
    if not torch.cuda.is_available():
        print("--bench times the ops on a CUDA GPU (triton.testing.do_bench); this machine has none, so nothing "
              "was timed.", file=out)
        return 0
    if triton_utils.triton is None or triton_utils.INTERPRET:
        print(f"--bench needs Triton compiled for the GPU; Triton here: {triton_mode()}. Nothing was timed.", file=out)
        return 0
    print(f"GPU time (median, triton.testing.do_bench), {BENCH_MODEL} 256 px, {STEPS} steps, batch {BENCH_BATCH} "
          f"rows, {_name(BENCH_DTYPE)}, on {device_description()}", file=out)
    print(f"{'op':<22}{'shape':<40}{'role':<22}{'provider':<22}{'GPU time':>12}{'enat speedup':>14}", file=out)
    generator = torch.Generator().manual_seed(0)
    for kind, dims, role in bench_shapes():
        inputs = make_inputs(kind, dims, BENCH_DTYPE, "cuda", generator)
        for op, spec in OPS.items():
            if spec.kind != kind:
                continue
            args = _arguments(op, inputs, REPORT_LAYOUTS[kind])
            ours = gpu_time(lambda: spec.fn(*args.values()))
            providers = {f"enat ({explain(spec.fn, *args.values()).chosen})": ours}
            providers.update({name: gpu_time(fn) for name, fn in _baselines(op, args).items()})
            for i, (provider, t) in enumerate(providers.items()):
                first = (op, describe(kind, dims, REPORT_LAYOUTS[kind]), role) if i == 0 else ("", "", "")
                print(f"{first[0]:<22}{first[1]:<40}{first[2]:<22}{provider:<22}{t * 1e6:>10.1f}us"
                      f"{'' if i == 0 else f'{t / ours:.2f}x':>14}", file=out, flush=True)
    return 0
