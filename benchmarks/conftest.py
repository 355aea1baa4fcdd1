"""Benchmark session: a results table per case and the contract's targets at the end of the run.

    pytest benchmarks/ --benchmark-only                             # all ops, all providers, all shapes
    pytest benchmarks/ --benchmark-only -m "not extended"           # the GPU check's subset
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json   # keep the results as data
    python benchmarks/summarize.py out.json                         # the targets table from them

pytest-benchmark's own table is the eager latency (one call, then a device synchronisation); the GPU
time (triton.testing.do_bench) is in extra_info and in the tables printed here. See harness.py.
"""

import pytest

from harness import environment
from summarize import summarize


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: a benchmark case left out of the GPU check (make bench runs it)")


def pytest_report_header(config):
    env = environment()
    return [f"benchmarks on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
            f"triton {env['triton']}, enat_kernels {env['enat_kernels']} "
            f"(CUDA extension {'loaded' if env['cuda_extension'] else 'absent'}, CPU kernels "
            f"{'loaded' if env['cpu_kernels'] else 'absent'}); time: {env['gpu_timer']}"]


def _format_time(seconds):
    if seconds is None:
        return f"{'-':>12}"
    return f"{seconds * 1e6:9.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:9.3f} ms"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    results = [b for b in (session.benchmarks if session else []) if b and "eager_s" in b.extra_info]
    if not results:
        return
    groups = {}
    for bench in results:
        groups.setdefault(bench.group, []).append(bench.extra_info)
    write = terminalreporter.write_line
    terminalreporter.section("enat_kernels results")
    env = environment()
    gpu = any(r.get("gpu_s") for rows in groups.values() for r in rows)
    write(f"{env['device']}, torch {env['torch']}, triton {env['triton']}; "
          + (f"GPU time: {env['gpu_timer']}" if gpu else "CPU: wall clock is the only time")
          + "; eager latency: one call, then a device synchronisation")
    for group, rows in groups.items():
        write("")
        write(group)
        write(f"  {'provider':<22}  {'GPU time' if gpu else 'wall (CPU)':>12}  {'throughput':>16}  "
              f"{'eager latency':>13}  vs baselines ({'GPU time' if gpu else 'wall'})")
        by_provider = {r["provider"]: r["time_s"] for r in rows}
        for r in sorted(rows, key=lambda r: r["time_s"]):
            cells = [f"  {r['provider']:<22}", _format_time(r["time_s"])]
            if r.get("images/s") is not None:
                cells.append(f"{r['images/s']:7.2f} images/s")
            elif r.get("TFLOP/s") is not None:
                cells.append(f"{r['TFLOP/s']:9.2f} TFLOP/s")
            elif r.get("GB/s") is not None:
                cells.append(f"{r['GB/s']:12.1f} GB/s")
            else:
                cells.append(f"{'':16}")
            cells.append(f"{_format_time(r['eager_s']):>13}")
            if r.get("GMACs/image") is not None:
                cells.append(f"{r['GMACs/image']:7.1f} GMACs/image")
            if "copy" in by_provider and r["provider"] != "copy" and r.get("GB/s") is not None:
                copy = next(c for c in rows if c["provider"] == "copy")
                cells.append(f"{r['GB/s'] / copy['GB/s']:5.0%} of copy GB/s")
            for base in r.get("baselines", ()) if r["provider"].startswith("enat-") else ():
                if base in by_provider:
                    cells.append(f"{by_provider[base] / r['time_s']:5.2f}x vs {base}")
            write("  ".join(cells))
    write("")
    summarize([dict(r) for rows in groups.values() for r in rows], write)
