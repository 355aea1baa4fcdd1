"""One line per benchmarked case from a pytest-benchmark JSON file: the fastest enat backend against
the baselines and the targets of the op contract.

    python benchmarks/summarize.py results.json

Attention: time, TFLOP/s, speed-up over cat+SDPA (target >= 2x forward, >= 1.5x forward+backward)
and time relative to SDPA on pre-concatenated K/V (target <= 1.1). Token movement: GB/s, fraction of
a plain copy of the same bytes (target >= 80%) and speed-up over boolean-mask indexing.
"""

import json
import sys


def _cases(benchmarks):
    cases = {}
    for b in benchmarks:
        info = b["extra_info"]
        key = (info["op"], info["mode"], info["shape"], info["dtype"])
        cases.setdefault(key, {})[info["provider"]] = info | {"median_s": b["stats"]["median"]}
    return cases


def _sample_line(key, providers):
    """Generation: images/s per provider and ENAT's speed-up over the paper-style path (CPU target 1.25x),
    eager and, on a GPU, replayed as a CUDA graph."""
    op, _, shape, dtype = key
    cells = [f"{op:<21} {shape:<10} {dtype:<8}"]
    cells += [f"{p} {r['images/s']:.2f} img/s" for p, r in providers.items() if r.get("images/s") is not None]
    if "enat-reuse" in providers and "paper-style" in providers:
        ratio = providers["paper-style"]["median_s"] / providers["enat-reuse"]["median_s"]
        on_cpu = providers["enat-reuse"].get("cuda") is None
        cells.append(f"{ratio:.2f}x vs paper-style" + (f" ({'ok' if ratio >= 1.25 else 'MISS'} >= 1.25 on CPU)"
                                                       if on_cpu else ""))
    if "enat-reuse-graph" in providers and "paper-style" in providers:
        ratio = providers["paper-style"]["median_s"] / providers["enat-reuse-graph"]["median_s"]
        cells.append(f"graph {ratio:.2f}x vs paper-style")
    return "  ".join(cells)


def _line(key, providers):
    op, mode, shape, dtype = key
    if op.startswith("sample "):
        return _sample_line(key, providers)
    ours = {p: r for p, r in providers.items() if p.startswith("enat-")}
    if not ours:
        return None
    best_name, best = min(ours.items(), key=lambda kv: kv[1]["median_s"])
    t = best["median_s"]
    cells = [f"{op:<21} {mode:<7} {dtype:<8} {shape:<30} {best_name:<15} {t * 1e6:9.1f} us"]
    if best.get("TFLOP/s") is not None:
        cells.append(f"{best['TFLOP/s']:7.1f} TFLOP/s")
    if best.get("GB/s") is not None:
        cells.append(f"{best['GB/s']:7.0f} GB/s")
    if "cat+sdpa" in providers:
        target = 2.0 if mode == "fwd" else 1.5
        ratio = providers["cat+sdpa"]["median_s"] / t
        cells.append(f"{ratio:5.2f}x vs cat+sdpa ({'ok' if ratio >= target else 'MISS'} >= {target})")
    if "sdpa (concatenated)" in providers and mode == "fwd":
        rel = t / providers["sdpa (concatenated)"]["median_s"]
        cells.append(f"{rel:5.2f} of sdpa time ({'ok' if rel <= 1.1 else 'MISS'} <= 1.1)")
    if "copy" in providers:
        frac = providers["copy"]["median_s"] / t
        cells.append(f"{frac:4.0%} of copy ({'ok' if frac >= 0.8 else 'MISS'} >= 80%)")
    if "bool-mask (paper)" in providers:
        cells.append(f"{providers['bool-mask (paper)']['median_s'] / t:5.2f}x vs bool-mask")
    return "  ".join(cells)


def main(path):
    with open(path) as f:
        data = json.load(f)
    if not data["benchmarks"]:
        print("no benchmark results")
        return
    env = data["benchmarks"][0]["extra_info"]
    print(f"{env['device']}: torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
          f"enat_kernels {env['enat_kernels']}")
    for key, providers in _cases(data["benchmarks"]).items():
        line = _line(key, providers)
        if line:
            print(line)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/summarize.py results.json")
    main(sys.argv[1])
