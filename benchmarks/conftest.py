"""Benchmark session: GPU-synchronised timing, and a compact results table at the end of the run.

    pytest benchmarks/ --benchmark-only                         # all ops, all providers
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json   # keep the results as data
"""

import pytest

from harness import ON_GPU, environment, synchronized_timer


def pytest_collection_modifyitems(items):
    if ON_GPU:
        for item in items:
            item.add_marker(pytest.mark.benchmark(timer=synchronized_timer))


def pytest_report_header(config):
    env = environment()
    return [f"benchmarks on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
            f"enat_kernels {env['enat_kernels']} (CUDA extension {'loaded' if env['cuda_extension'] else 'absent'})"]


def _format_time(seconds):
    return f"{seconds * 1e6:9.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:9.3f} ms"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    results = [b for b in (session.benchmarks if session else []) if b and "median_s" in b.extra_info]
    if not results:
        return
    groups = {}
    for bench in results:
        groups.setdefault(bench.group, []).append(bench.extra_info)
    write = terminalreporter.write_line
    terminalreporter.section("enat_kernels results")
    write(f"{environment()['device']}, torch {environment()['torch']}, triton {environment()['triton']}")
    for group, rows in groups.items():
        write("")
        write(group)
        by_provider = {r["provider"]: r["median_s"] for r in rows}
        for r in sorted(rows, key=lambda r: r["median_s"]):
            cells = [f"  {r['provider']:<22}", _format_time(r["median_s"])]
            if r.get("TFLOP/s") is not None:
                cells.append(f"{r['TFLOP/s']:8.2f} TFLOP/s")
            if r.get("GB/s") is not None:
                cells.append(f"{r['GB/s']:8.1f} GB/s")
            if r.get("images/s") is not None:
                cells.append(f"{r['images/s']:8.2f} images/s  {r['GMACs/image']:7.1f} GMACs/image")
            if "copy" in by_provider and r["provider"] != "copy":
                cells.append(f"{by_provider['copy'] / r['median_s']:6.0%} of copy")
            for base in r.get("baselines", ()) if r["provider"].startswith("enat-") else ():
                if base in by_provider:
                    cells.append(f"{by_provider[base] / r['median_s']:6.2f}x vs {base}")
            write("  ".join(cells))
