"""Compile every Triton kernel of enat_kernels ahead of time for sm_80 (A100) and sm_90 (H100), without a
GPU, and report per kernel and config: registers per thread, spill stores and loads, shared memory per
block, and the instructions the products (tl.dot) lower to.

    python scripts/gpu_resources.py              # the markdown table of docs/OPS.md
    python scripts/gpu_resources.py --json FILE  # every compile, for tests/test_gpu_targets.py

How: each op's Triton host function is called on CPU tensors laid out as the ENAT model lays them out,
with the package's launcher recording each launch instead of running it. A recorded launch of an
autotuned kernel is expanded over the configs its kernel lists for the target family
(triton_utils.target_autotune; all of the token kernels' configs, enat_kernels/ops/_tiles.py), and each resulting
specialization is compiled once by triton.compile for GPUTarget("cuda", 80 or 90, 32), in a process
pool. Registers and spills are read from Triton's own `ptxas -v` run, shared memory from the compiled
kernel, the products' lowering from its TTGIR (warp-group MMA: wgmma; MMA v2: mma.sync; blocked: FMA).

What is compiled (the classes that change the binary):
- attention forward and backward: fp16 and bf16 at head dims 16, 32, 61, 64, 96 and 128 (padded head
  dims 16, 32, 64, 128 with and without column masks), fp32 at 16 and 32 (the Triton backend takes
  fp32 GPU tensors up to head dim 32 only), in the model's layout (q, k_self, v_self
  strided views of one projection; the ENAT-L training decoder's lengths Lq = Ls = 205, Lc = 51). The
  forward's negative-scale variant (a min instead of a max) and other length specializations (lengths
  divisible by 16, Lc = 0) are compiled for fp16 at head dim 64 only.
- token movement: fp16 and fp32 rows (the kernels move bytes: bf16 compiles to the fp16 binary) of
  widths 32, 366 (ENAT-S), 768 (ENAT-B) and 1024 (ENAT-L), 256 tokens with 205 selected per row.
- adaLN: fp16, bf16 and fp32 at the same widths; mask_to_index at 256, 1024, 4096 and 65536 positions.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("gpu_resources.py compiles for GPUs: run it without TRITON_INTERPRET=1")

TARGETS = {"sm80": 80, "sm90": 90}
MAX_REGISTERS = 255


def _triton():
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    return triton, knobs, GPUTarget, ASTSource, make_backend, JITFunction, create_function_from_signature


# Recording launches.


def _model_views(B, L, parts, H, D, dtype):
    """(B, H, L, D) views of the parts of one (B, L, parts * H * D) projection, as enat.model makes them."""
    import torch

    t = torch.randn(B, L, parts * H * D).to(dtype).view(B, L, parts, H, D)
    return [t[:, :, i].transpose(1, 2) for i in range(parts)]


def _attention_cases():
    """(label, call) of the attention forward and backward at every dtype and head-dim class."""
    import torch

    A = sys.modules["enat_kernels.ops.asymmetric_attention"]
    heads = {16: 4, 32: 4, 61: 6, 64: 16, 96: 8, 128: 8}  # D: H (ENAT-S 61 x 6, ENAT-B 96 x 8, ENAT-L 64 x 16)

    def call(dtype, D, Lq, Lc, scale_sign=1.0):
        H = heads[D]
        q, k_self, v_self = _model_views(2, Lq, 3, H, D, dtype)
        k_ctx, v_ctx = _model_views(2, Lc, 2, H, D, dtype)
        scale = scale_sign * D**-0.5

        def run():
            out, lse = A.asymmetric_attention_triton(q, k_ctx, v_ctx, k_self, v_self, scale)
            A.asymmetric_attention_backward_triton(out, q, k_ctx, v_ctx, k_self, v_self, out, lse, scale)

        return run

    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in heads:
            if dtype == torch.float32 and D > A.TRITON_FP32_MAX_D:
                continue  # routed to the next backend on a GPU (A._triton_why_not)
            cases.append((f"attention {_dtype_name(dtype)} D={D}", call(dtype, D, 205, 51)))
    cases.append(("attention fp16 D=64 scale<0", call(torch.float16, 64, 205, 51, -1.0)))
    cases.append(("attention fp16 D=64 Lq=Ls=256 Lc=0", call(torch.float16, 64, 256, 0)))
    return cases


def _token_cases():
    import torch

    gs = sys.modules["enat_kernels.ops.gather_scatter"]
    sr = sys.modules["enat_kernels.ops.split_restore"]
    mc = sys.modules["enat_kernels.ops.merge_cache"]
    B, L, n = 2, 256, 205

    def call(dtype, D):
        x = torch.randn(B, L, D).to(dtype)
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[:, torch.randperm(L)[:n]] = True
        index = mask.nonzero()[:, 1].view(B, n)
        other = (~mask).nonzero()[:, 1].view(B, L - n)
        rows = x[:, :n]

        def run():
            gs.gather_tokens_triton(x, index)
            gs.scatter_tokens_inplace_triton(x.clone(), index, rows)
            gs.scatter_tokens_triton(x, index, rows)
            gs.scatter_into_zeros_triton(index, rows, L)
            gs.zero_rows_triton(x, index)
            visible, masked = sr.split_tokens_triton(x, mask, n)
            sr.restore_tokens_triton(visible, masked, mask)
            merged = mc.merge_cache_triton(masked, index, visible, other)
            mc.merge_cache_backward_triton(merged, index, other)

        return run

    return [(f"tokens {_dtype_name(dtype)} D={D}", call(dtype, D))
            for dtype in (torch.float16, torch.float32) for D in (32, 366, 768, 1024)]


def _adaln_cases():
    import torch

    ad = sys.modules["enat_kernels.ops.adaln"]
    B, L = 2, 256

    def call(dtype, d):
        x, y = (torch.randn(B, L, d).to(dtype) for _ in range(2))
        mod = torch.randn(B, 8 * d).to(dtype)  # the model's modulation rows: chunks of one (B, 8d) tensor
        shift, scale, gate = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:3 * d]

        def run():
            out = ad.adaln_triton(x, shift, scale, 1e-6)
            ad.adaln_backward_triton(out, x, scale, 1e-6)
            x_new, out = ad.residual_adaln_triton(x, y, gate, shift, scale, 1e-6)
            ad.residual_adaln_backward_triton(out, out, x_new, y, gate, scale, 1e-6)

        return run

    return [(f"adaln {_dtype_name(dtype)} d={d}", call(dtype, d))
            for dtype in (torch.float16, torch.bfloat16, torch.float32) for d in (32, 366, 768, 1024)]


def _mask_cases():
    import torch

    mi = sys.modules["enat_kernels.ops.mask_to_index"]

    def call(L):
        mask = torch.rand(2, L) < 0.8
        mask[1] = mask[0]
        return lambda: mi.mask_to_index_triton(mask, int(mask[0].sum()))

    return [(f"mask_to_index L={L}", call(L)) for L in (256, 1024, 4096, 65536)]


def _dtype_name(dtype):
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]


def record_jobs(family, only=None):
    """{compile key: job} of every kernel specialization the cases (those whose label contains `only`)
    launch on target `family`."""
    import torch

    triton, knobs, GPUTarget, ASTSource, make_backend, JITFunction, create_function_from_signature = _triton()
    import enat_kernels.ops  # noqa: F401
    from enat_kernels import triton_utils

    target = GPUTarget("cuda", TARGETS[family], 32)
    backend = make_backend(target)
    jobs = {}
    state = {}

    def add_job(fn, args, kwargs):
        kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        name = fn.fn.__name__
        key = (fn.fn.__module__, name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
        job = jobs.setdefault(key, dict(module=fn.fn.__module__, name=name, signature=signature,
                                        constexprs=constexprs, attrs=attrs, options=options.__dict__,
                                        target=family, config=state.get("config"), cases=[]))
        if state["case"] not in job["cases"]:
            job["cases"].append(state["case"])

    def fake_run(self, *args, grid, warmup, **kwargs):
        add_job(self, args, kwargs)

    def fake_launch(kernel, grid, args, meta, config=None, tune_key=None):
        configs = kernel.configs_for(family, **meta) if hasattr(kernel, "configs_for") else kernel.configs
        for c in configs:
            state["config"] = dict(index=kernel.configs.index(c), kwargs=c.kwargs, num_warps=c.num_warps,
                                   num_stages=c.num_stages)
            kernel.fn.run(*args, grid=None, warmup=True, **meta, **c.all_kwargs())
        state["config"] = None

    saved = JITFunction.run, triton_utils.launch, triton_utils.AOT_CAPABILITY
    JITFunction.run, triton_utils.launch = fake_run, fake_launch
    triton_utils.AOT_CAPABILITY = (TARGETS[family] // 10, 0)
    try:
        torch.manual_seed(0)
        for label, run in _attention_cases() + _token_cases() + _adaln_cases() + _mask_cases():
            if only is not None and only not in label:
                continue
            state["case"] = label
            run()
    finally:
        JITFunction.run, triton_utils.launch, triton_utils.AOT_CAPABILITY = saved
    return jobs


# Compiling.


def _dot_lowering(ttgir):
    """Counts of the products by lowering: wgmma (warp-group MMA), mma.sync (MMA v2), fma (blocked)."""
    encodings = dict(re.findall(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d)", ttgir, re.M))
    counts = collections.Counter()
    counts["wgmma"] = len(re.findall(r"ttng\.warp_group_dot ", ttgir))
    for result in re.findall(r"= tt\.dot .* -> tensor<[^,>]+, (#\w+)>", ttgir):
        counts["mma.sync" if encodings.get(result) == "2" else "fma"] += 1
    return {k: v for k, v in counts.items() if v}


def compile_job(job):
    """Compile one job; returns it with registers, spills, shared memory and the products' lowering."""
    triton, knobs, GPUTarget, ASTSource, *_ = _triton()
    fn = importlib.import_module(job["module"])
    for part in job["name"].split("."):
        fn = getattr(fn, part)
    while not hasattr(fn, "params"):  # Autotuner / Heuristics -> the JITFunction
        fn = fn.fn
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # the ptxas log is only printed by a fresh compile
    result = dict(job)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                    target=GPUTarget("cuda", TARGETS[job["target"]], 32), options=job["options"])
    except Exception as e:  # reported per compile, the table and the test show it
        result.update(error=f"{type(e).__name__}: {str(e)[-2000:]}", seconds=time.perf_counter() - start)
        return result
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    static_smem = re.search(r"(\d+) bytes smem", text)
    result.update(
        error=None, seconds=time.perf_counter() - start,
        registers=int(regs.group(1)) if regs else None,
        spill_stores=int(spills.group(1)) if spills else None, spill_loads=int(spills.group(2)) if spills else None,
        shared_memory=kernel.metadata.shared + (int(static_smem.group(1)) if static_smem else 0),
        products=_dot_lowering(kernel.asm["ttgir"]),
        ptx_wgmma=kernel.asm["ptx"].count("wgmma.mma_async"), ptx_mma_sync=kernel.asm["ptx"].count("mma.sync"),
    )
    return result


def _jsonable(job):
    """The job with its tuple-keyed dicts as lists (JSON), values as repr where they are not plain."""
    out = dict(job)
    out["constexprs"] = [[list(k), v if isinstance(v, (bool, int, float, str)) else repr(v)]
                         for k, v in job["constexprs"].items()]
    out["attrs"] = [[list(k), v] for k, v in job["attrs"].items()]
    out["options"] = {k: v for k, v in job["options"].items() if isinstance(v, (bool, int, float, str, type(None)))}
    return out


def run(jobs_per_worker=2, targets=tuple(TARGETS), only=None):
    """Every compile of every target (of the cases whose label contains `only`), as JSON-able dicts."""
    jobs = [job for family in targets for job in record_jobs(family, only).values()]
    results = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # workers inherit it: no compile reads or fills the user's cache
        context = multiprocessing.get_context("spawn")
        # Workers are replaced every 100 compiles: each compile leaves some memory behind.
        with concurrent.futures.ProcessPoolExecutor(jobs_per_worker, mp_context=context,
                                                    max_tasks_per_child=100) as pool:
            for i, result in enumerate(pool.map(compile_job, jobs, chunksize=4), 1):
                results.append(_jsonable(result))
                if i % 100 == 0 or i == len(jobs):
                    print(f"gpu_resources: {i}/{len(jobs)} compiled", file=sys.stderr, flush=True)
    return results


# Reporting.


def config_label(job):
    c = job["config"]
    if c is None:
        return "w{}".format(job["options"].get("num_warps"))
    kwargs = " ".join(f"{k}={v}" for k, v in c["kwargs"].items())
    return f"#{c['index']} {kwargs} w{c['num_warps']} s{c['num_stages']}"


def _span(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _inputs(job):
    """The input dtypes of a compile's cases ("attention fp16 D=61" -> fp16)."""
    return sorted({word for case in job["cases"] for word in case.split() if word in ("fp16", "bf16", "fp32")})


def table(results):
    """Markdown: one row per kernel, config, target and input kind (attention: fp16/bf16 products on tensor
    cores, fp32 ones on FMA), over the dtypes and widths compiled."""
    rows = collections.defaultdict(list)
    for r in results:
        kind = ("fp32" if _inputs(r) == ["fp32"] else "fp16/bf16") if r["name"].startswith("_attention") else "all"
        rows[(r["name"], config_label(r), r["target"], kind)].append(r)
    lines = ["| kernel | config | target | inputs | compiles | registers | spill st/ld (B) | shared memory (B) "
             "| products |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, label, target, kind), rs in sorted(rows.items()):
        ok = [r for r in rs if r["error"] is None]
        lowering = collections.Counter()
        for r in ok:
            lowering.update(r["products"])
        products = ", ".join(f"{k} {v}" for k, v in sorted(lowering.items())) or "-"
        failed = f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""
        spill_stores = max((r["spill_stores"] or 0) for r in ok) if ok else "-"
        spill_loads = max((r["spill_loads"] or 0) for r in ok) if ok else "-"
        lines.append(f"| {name} | {label} | {target} | {kind} | {len(rs)}{failed} | "
                     f"{_span(r['registers'] for r in ok)} | {spill_stores}/{spill_loads} | "
                     f"{_span(r['shared_memory'] for r in ok)} | {products} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write every compile to FILE instead of printing the table")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="only this target (repeatable)")
    parser.add_argument("--only", metavar="TEXT",
                        help="only the cases whose label contains TEXT, e.g. 'attention fp16'")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(args.jobs, tuple(args.target or TARGETS), args.only)
    elapsed = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(seconds=elapsed, results=results), f)
    else:
        import triton

        print(table(results))
        print(f"\n{len(results)} compiles in {elapsed:.0f} s, Triton {triton.__version__}.")


if __name__ == "__main__":
    main()
