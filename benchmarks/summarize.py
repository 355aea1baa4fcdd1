"""The benchmark results against the targets of the op contract (docs/OPS.md, "Performance targets").

    python benchmarks/summarize.py results.json [more.json ...]   # pytest-benchmark JSON files

Per op and mode, one line per shape: GPU time of each provider (on a CPU: wall-clock time, the only
time there), TFLOP/s or GB/s derived from it, the eager latency (host + GPU, synchronised per call) of
enat-auto, and the targets that apply, each with ok or MISS:

- asymmetric_attention: enat-triton forward GPU time <= 1.1x SDPA on pre-concatenated K/V ("sdpa
  (concatenated)"), forward+backward <= 1.15x; enat-cuda forward <= 1.25x enat-triton forward.
- token movement: enat-auto at >= 80% of the copy bandwidth (GB/s for the bytes the op must move,
  against a plain copy's GB/s) and never slower than the torch index way (torch.gather / torch.scatter
  / torch.argsort: provider "torch.*").
- host path: at the tiny shapes, enat-auto's eager latency <= 3x the nearest torch call's (SDPA on
  concatenated K/V for attention, the torch.* provider for token movement).
adaln and residual_adaln (bench_adaln.py) get a table with no target: times, GB/s and the speed-up of
enat-auto over the unfused PyTorch ("torch").
Then, per target, how many shapes pass and the shape at which it is worst, with the number.
The GPU targets are checked only on results that have GPU time; the host-path one everywhere.
Whole-generation results (bench_model.py): images/s per provider, and for the engine's best (eager or
CUDA graph) TFLOP/s, share of the bf16 matmul ceiling measured in the same run, peak memory, and the
speed-up over the plain-PyTorch baseline and the paper-style path, with the generation targets.
Eager sampling where host cost dominates (bench_sample_host): enat's time against the plain-PyTorch
baseline's, at most 1.0x on a CPU (one thread), at most 1.1x on a GPU at batch 1 and at most 1.0x from
batch 8.
"""

import json
import sys

FLOOR = "sdpa (concatenated)"
ATTENTION = "asymmetric_attention"
ATTENTION_COLUMNS = {"enat-auto": "auto", "enat-triton": "triton", "enat-cuda": "cuda", FLOOR: "sdpa-cat",
                     "cat+sdpa": "cat+sdpa", "naive (paper)": "naive"}
ADALN_OPS = ("adaln", "residual_adaln")
ADALN_COLUMNS = {"enat-auto": "auto", "enat-triton": "triton", "torch": "torch"}
TOKEN_COLUMNS = {"enat-auto": "auto", "enat-triton": "triton", "enat-cuda": "cuda", "enat-reference": "ref",
                 "torch.*": "torch", "bool-mask (paper)": "boolmask", "copy": "copy"}


class Target:
    """A target checked per shape: value = numerator / denominator, ok when value <= limit (or >=)."""

    def __init__(self, name, limit, at_least=False, percent=False):
        self.name, self.limit, self.at_least, self.percent = name, limit, at_least, percent
        self.results = []  # (value, shape description)

    def check(self, value, where):
        self.results.append((value, where))
        ok = value >= self.limit if self.at_least else value <= self.limit
        return "ok" if ok else "MISS"

    def worst_line(self):
        if not self.results:
            return f"  {self.name}: no results"
        worst = (min if self.at_least else max)(self.results, key=lambda r: r[0])
        passed = sum(1 for v, _ in self.results if (v >= self.limit if self.at_least else v <= self.limit))
        return (f"  {self.name}: {passed}/{len(self.results)} ok; worst {_ratio(worst[0], self.percent)} "
                f"at {worst[1]}")


def _ratio(value, percent=False):
    return f"{value:.0%}" if percent else f"{value:.2f}x"


def _num(value):
    """A throughput with three significant digits."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _time(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.1f}" if seconds < 1e-2 else f"{seconds * 1e6:.0f}"


def _provider_key(provider):
    return "torch.*" if provider.startswith("torch.") else provider


def records_from_json(paths):
    """The extra_info of every benchmark in the files, with eager_s filled from the stats if absent."""
    records = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            info = dict(b["extra_info"])
            if b.get("stats"):
                info.setdefault("eager_s", b["stats"]["median"])
                info.setdefault("median_s", b["stats"]["median"])
            records.append(info)
    return records


def _cases(records):
    cases = {}
    for r in records:
        if r.get("eager_s") is None and r.get("median_s") is None:
            continue
        key = (r["op"], r["mode"], r.get("role") or "", r["shape"], r["dtype"], r.get("layout") or "")
        cases.setdefault(key, {})[_provider_key(r["provider"])] = r
    return cases


def _gpu(r):
    return r.get("gpu_s")


def _seconds(r):
    """GPU time where measured, else the eager (wall-clock) time."""
    return r.get("gpu_s") or r.get("time_s") or r.get("eager_s") or r.get("median_s")


def _eager(r):
    return r.get("eager_s") or r.get("median_s")


def _present(names, rows):
    """The names (providers) that any row has, in order."""
    return [n for n in names if any(n in providers for _, providers in rows)]


def _times(providers, columns):
    """One time cell per column: the provider's time in us, or '-'."""
    return " ".join(f"{_time(_seconds(providers[p])) if p in providers else '-':>9}" for p in columns)


def _best(providers, names):
    """The fastest (images/s) of the named providers present, as (name, record), or None."""
    present = [(n, providers[n]) for n in names if providers.get(n, {}).get("images/s")]
    return max(present, key=lambda item: item[1]["images/s"]) if present else None


def _generation_table(rows, ceiling, targets, on_gpu, write):
    """Generation: images/s per provider; for the engine's best (eager or graph): TFLOP/s, share of the
    measured bf16 matmul ceiling, peak memory, and its speed-up over the plain-PyTorch baseline's best
    and over the paper-style path; the generation targets."""
    names = ["enat", "enat-graph", "enat+pixels", "enat-graph+pixels", "torch", "torch-graph", "paper-style",
             "enat-no-reuse", "plain-nat"]
    columns = _present(names, rows)
    write(f"  {'model':<24} {'shape':<9} " + " ".join(f"{n:>12}" for n in columns)
          + "   best enat: TFLOP/s  of ceiling  peak GB  vs torch  vs paper-style   (images/s)")
    for key, providers in rows:
        op, _, _, shape, _, _ = key
        cells = [f"  {op.removeprefix('sample '):<24} {shape:<9}"]
        cells.append(" ".join(f"{providers[n]['images/s']:12.2f}" if n in providers else f"{'-':>12}"
                              for n in columns))
        best, base = _best(providers, ("enat", "enat-graph")), _best(providers, ("torch", "torch-graph"))
        if best is None:
            write(" ".join(cells))
            continue
        name, r = best
        share = r["TFLOP/s"] / ceiling if ceiling and r.get("TFLOP/s") else None
        vs_torch = r["images/s"] / base[1]["images/s"] if base else None
        paper = providers.get("paper-style", {}).get("images/s")
        peak = f"{r['peak_GB']:7.2f}" if r.get("peak_GB") is not None else f"{'-':>7}"
        cells.append(f"  {name:<10} {r.get('TFLOP/s', 0):7.1f}  {_ratio(share, True) if share else '-':>10}  {peak}")
        cells.append(f"  {_ratio(vs_torch) if vs_torch else '-':>8}  {_ratio(r['images/s'] / paper) if paper else '-':>13}")
        where = f"{op} {shape}"
        checks = []
        if on_gpu and op == "sample ENAT-L 256px" and shape.startswith("B128 "):
            if share is not None:
                checks.append(targets["ceiling"].check(share, where))
            if vs_torch is not None:
                checks.append(targets["torch-128"].check(vs_torch, where))
        if on_gpu and op == "sample ENAT-L 256px" and shape.startswith("B32 ") and "enat" in providers \
                and "torch" in providers:
            checks.append(targets["torch-32"].check(providers["enat"]["images/s"] / providers["torch"]["images/s"],
                                                    where))
        if on_gpu and op == "sample ENAT-L 512px" and vs_torch is not None:
            checks.append(targets["torch-512"].check(vs_torch, where))
        if not on_gpu and paper and "enat" in providers:
            checks.append(targets["cpu"].check(providers["enat"]["images/s"] / paper, where))
        write(" ".join(cells) + ("  " + " ".join(checks) if checks else ""))


def _write_header(env, on_gpu, write):
    """The machine and versions of the run, and what the times are."""
    write(f"{env['device']}: torch {env['torch']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
          f"triton {env['triton']}, python {env.get('python')}, enat_kernels {env['enat_kernels']} "
          f"(CUDA extension {'loaded' if env.get('cuda_extension') else 'absent'}, "
          f"CPU kernels {'loaded' if env.get('cpu_kernels') else 'absent'})")
    write("times in us; " + ("GPU time: " + env.get("gpu_timer", "?") if on_gpu else
                             "CPU: wall-clock time is the only time (GPU targets not checked)")
          + "; eager: host + GPU latency of one synchronised call")


def _targets():
    """The targets of the op contract, by the name the tables check them under."""
    return {
        "fwd": Target("attention enat-triton fwd <= 1.1x sdpa (concatenated)", 1.1),
        "fwd+bwd": Target("attention enat-triton fwd+bwd <= 1.15x sdpa (concatenated)", 1.15),
        "cuda": Target("attention enat-cuda fwd <= 1.25x enat-triton fwd", 1.25),
        "copy": Target("token ops enat-auto >= 80% of copy bandwidth", 0.8, at_least=True, percent=True),
        "torch": Target("token ops enat-auto GPU time <= 1.0x the torch index way", 1.0),
        "host": Target("host path: enat-auto eager latency at the tiny shape <= 3x the nearest torch call", 3.0),
        "ceiling": Target("generation ENAT-L 256px B128: best enat >= 50% of the bf16 matmul ceiling", 0.5,
                          at_least=True, percent=True),
        "torch-128": Target("generation ENAT-L 256px B128: best enat >= 1.8x best torch baseline", 1.8,
                            at_least=True),
        "torch-32": Target("generation ENAT-L 256px B32: enat >= 2x torch baseline (no graphs)", 2.0, at_least=True),
        "torch-512": Target("generation ENAT-L 512px B16: best enat >= 1.8x best torch baseline", 1.8,
                            at_least=True),
        "cpu": Target("generation on a CPU: enat >= 1.25x paper-style", 1.25, at_least=True),
        "host-cpu": Target("eager sampling (host-bound) on a CPU: enat time <= 1.0x torch baseline", 1.0),
        "host-gpu-1": Target("eager sampling (host-bound) on a GPU, batch 1: enat time <= 1.1x torch baseline", 1.1),
        "host-gpu-8": Target("eager sampling (host-bound) on a GPU, batch >= 8: enat time <= 1.0x torch baseline",
                             1.0),
        "train-paper": Target("training step (plain, reuse): enat-kernels >= 1.5x paper-style images/s", 1.5,
                              at_least=True),
        "train-torch": Target("training step (plain, reuse): enat-kernels ahead of torch-sdpa images/s", 1.0,
                              at_least=True),
    }


def _sections(cases):
    """{section title: [(key, providers)]}, in the order the cases come."""
    sections = {}
    for key, providers in cases.items():
        op, mode, role = key[:3]
        if op.startswith("eager sampling"):
            section = "eager sampling (host-bound)"
        elif op.startswith("sample "):
            section = "generation"
        elif op.startswith("train step"):
            section = "training steps"
        elif role == "tiny":
            section = "host path (tiny shapes, eager latency)"
        else:
            section = f"{op} {mode}"
        sections.setdefault(section, []).append((key, providers))
    return sections


def summarize(records, write=print):
    """Write the tables and the target lines for a list of result records (extra_info dicts)."""
    records = [r for r in records if r.get("op")]
    if not records:
        write("no benchmark results")
        return
    on_gpu = any(_gpu(r) for r in records)
    _write_header(records[0], on_gpu, write)
    targets = _targets()
    ceiling = next((r["TFLOP/s"] for r in records if r["op"] == "matmul ceiling" and r.get("TFLOP/s")), None)
    agreement = [r for r in records if r["op"] == "bf16 agreement"]
    records = [r for r in records if r["op"] not in ("matmul ceiling", "bf16 agreement")]
    for section, rows in _sections(_cases(records)).items():
        write("")
        write(section)
        if section == "generation":
            write(f"  bf16 matmul ceiling: {ceiling:.0f} TFLOP/s (measured in this run)" if ceiling else
                  "  bf16 matmul ceiling: not measured")
            for r in agreement:
                write(f"  token agreement of the bf16 engine with the fp32 model ({r['shape']}): {r['agreement']:.1%}")
            _generation_table(rows, ceiling, targets, on_gpu, write)
        elif section == "training steps":
            _training_table(rows, targets, on_gpu, write)
        elif section.startswith("eager sampling"):
            _sampling_host_table(rows, targets, on_gpu, write)
        elif section.startswith("host path"):
            _host_table(rows, targets["host"], write)
        elif section.startswith(ATTENTION):
            _attention_table(rows, targets, on_gpu, write)
        elif section.split(" ")[0] in ADALN_OPS:
            _adaln_table(rows, write)
        else:
            _token_table(rows, targets, on_gpu, write)

    shown = [t for name, t in targets.items()
             if t.results or (on_gpu and name not in ("host", "cpu", "host-cpu"))]
    if shown:
        write("")
        write("targets (worst shape)")
        for target in shown:
            write(target.worst_line())


def _where(key, providers):
    op, mode, role, shape, dtype, layout = key
    return f"{op} {mode} {role + ' ' if role else ''}{shape} {dtype}{' ' + layout if layout else ''}"


def _attention_table(rows, targets, on_gpu, write):
    columns = _present(ATTENTION_COLUMNS, rows)
    write(f"  {'dtype':<8} {'layout':<10} {'role':<20} {'shape':<30} "
          + " ".join(f"{ATTENTION_COLUMNS[p]:>9}" for p in columns)
          + "  TFLOP/s(triton|auto)  targets  eager(auto)")
    for key, providers in rows:
        op, mode, role, shape, dtype, layout = key
        cells = [f"  {dtype:<8} {layout:<10} {role:<20} {shape:<30}", _times(providers, columns)]
        main = providers.get("enat-triton") or providers.get("enat-auto")
        cells.append(f"  {_num(main['TFLOP/s']):>20}" if main and main.get("TFLOP/s") is not None else f"  {'-':>20}")
        checks = []
        where = _where(key, providers)
        triton, cuda, floor = providers.get("enat-triton"), providers.get("enat-cuda"), providers.get(FLOOR)
        if on_gpu and triton and floor and _gpu(triton) and _gpu(floor) and mode in ("fwd", "fwd+bwd"):
            value = _gpu(triton) / _gpu(floor)
            checks.append(f"triton/sdpa {value:.2f} {targets[mode].check(value, where)}")
        if on_gpu and mode == "fwd" and triton and cuda and _gpu(triton) and _gpu(cuda):
            value = _gpu(cuda) / _gpu(triton)
            checks.append(f"cuda/triton {value:.2f} {targets['cuda'].check(value, where)}")
        cells.append("  " + ("; ".join(checks) if checks else "-"))
        auto = providers.get("enat-auto")
        cells.append(f"  {_time(_eager(auto)) if auto else '-'}")
        write(" ".join(cells))


def _token_table(rows, targets, on_gpu, write):
    columns = _present(TOKEN_COLUMNS, rows)
    write(f"  {'dtype':<8} {'shape':<26} " + " ".join(f"{TOKEN_COLUMNS[p]:>9}" for p in columns)
          + "  GB/s(auto)  targets  eager(auto)")
    for key, providers in rows:
        op, mode, role, shape, dtype, layout = key
        cells = [f"  {dtype:<8} {shape:<26}", _times(providers, columns)]
        auto = providers.get("enat-auto")
        cells.append(f"  {_num(auto['GB/s']):>10}" if auto and auto.get("GB/s") is not None else f"  {'-':>10}")
        checks = []
        where = _where(key, providers)
        copy, torch_way = providers.get("copy"), providers.get("torch.*")
        if on_gpu and auto and copy and auto.get("GB/s") and copy.get("GB/s"):
            value = auto["GB/s"] / copy["GB/s"]
            checks.append(f"{value:.0%} of copy {targets['copy'].check(value, where)}")
        if on_gpu and auto and torch_way and _gpu(auto) and _gpu(torch_way):
            value = _gpu(auto) / _gpu(torch_way)
            checks.append(f"{value:.2f}x torch's time {targets['torch'].check(value, where)}")
        cells.append("  " + ("; ".join(checks) if checks else "-"))
        cells.append(f"  {_time(_eager(auto)) if auto else '-'}")
        write(" ".join(cells))


def _adaln_table(rows, write):
    columns = _present(ADALN_COLUMNS, rows)
    write(f"  {'dtype':<9} {'role':<11} {'shape':<18} " + " ".join(f"{ADALN_COLUMNS[p]:>9}" for p in columns)
          + "  GB/s(auto)  auto vs torch  eager(auto)")
    for key, providers in rows:
        op, mode, role, shape, dtype, layout = key
        auto, base = providers.get("enat-auto"), providers.get("torch")
        cells = [f"  {dtype:<9} {role:<11} {shape:<18}", _times(providers, columns),
                 f"  {_num(auto['GB/s']) if auto and auto.get('GB/s') is not None else '-':>10}",
                 f"  {_seconds(base) / _seconds(auto):12.2f}x" if auto and base else f"  {'-':>13}",
                 f"  {_time(_eager(auto)) if auto else '-'}"]
        write(" ".join(cells))


def _training_table(rows, targets, on_gpu, write):
    """Training steps: images/s and peak memory per provider, enat-kernels against paper-style and
    torch-sdpa; the training targets for the plain and reuse steps on a GPU."""
    names = ["enat-kernels", "paper-style", "torch-sdpa"]
    write(f"  {'model':<18} {'step':<6} {'shape':<10} " + " ".join(f"{n:>13}" for n in names)
          + "  peak GB (each)       vs paper-style  vs torch-sdpa   (images/s)")
    for key, providers in rows:
        op, mode, _, shape, _, _ = key
        rate = {n: providers[n]["images/s"] for n in names if providers.get(n, {}).get("images/s")}
        peaks = " ".join(f"{providers[n]['peak_GB']:.1f}" if providers.get(n, {}).get("peak_GB") is not None
                         else "-" for n in names)
        cells = [f"  {op.removeprefix('train step '):<18} {mode:<6} {shape:<10}",
                 " ".join(f"{rate[n]:13.1f}" if n in rate else f"{'-':>13}" for n in names), f"  {peaks:<20}"]
        ours = rate.get("enat-kernels")
        ratios = {n: ours / rate[n] for n in ("paper-style", "torch-sdpa") if ours and n in rate}
        cells.append(" ".join(f"{_ratio(ratios[n]) if n in ratios else '-':>14}"
                              for n in ("paper-style", "torch-sdpa")))
        checks = []
        if on_gpu and mode in ("plain", "reuse"):
            where = f"{op} {mode} {shape}"
            if "paper-style" in ratios:
                checks.append(targets["train-paper"].check(ratios["paper-style"], where))
            if "torch-sdpa" in ratios:
                checks.append(targets["train-torch"].check(ratios["torch-sdpa"], where))
        write(" ".join(cells) + ("  " + " ".join(checks) if checks else ""))


def _sampling_host_table(rows, targets, on_gpu, write):
    """Eager generation where host cost dominates: ms per batch of enat and torch, and their ratio."""
    write(f"  {'shape':<10} {'dtype':<9} {'enat ms':>9} {'torch ms':>9}  enat/torch")
    for key, providers in rows:
        _, _, _, shape, dtype, _ = key
        ours, base = providers.get("enat"), providers.get("torch")
        cells = [f"  {shape:<10} {dtype:<9} {_eager(ours) * 1e3 if ours else float('nan'):9.2f} "
                 f"{_eager(base) * 1e3 if base else float('nan'):9.2f}"]
        if ours and base:
            value = _eager(ours) / _eager(base)
            batch = int(shape.split()[0].removeprefix("B"))
            name = "host-cpu" if not on_gpu else "host-gpu-1" if batch < 8 else "host-gpu-8"
            cells.append(f"  {value:9.2f}x {targets[name].check(value, f'{shape} {dtype}')}")
        write("".join(cells))


def _host_table(rows, target, write):
    write(f"  {'op':<22} {'mode':<8} {'shape':<26} {'dtype':<8} {'enat-auto':>10} {'torch':>10}  ratio  "
          "(eager latency, us; torch = the nearest torch call)   triton / cuda eager")
    for key, providers in rows:
        op, mode, role, shape, dtype, layout = key
        auto = providers.get("enat-auto")
        torch_way = providers.get(FLOOR if op == ATTENTION else "torch.*")
        cells = [f"  {op:<22} {mode:<8} {shape:<26} {dtype:<8} {_time(_eager(auto)) if auto else '-':>10} "
                 f"{_time(_eager(torch_way)) if torch_way else '-':>10}"]
        if auto and torch_way:
            value = _eager(auto) / _eager(torch_way)
            cells.append(f"  {value:.2f}x {target.check(value, _where(key, providers))}")
        others = [f"{_time(_eager(providers[p]))}" for p in ("enat-triton", "enat-cuda") if p in providers]
        if others:
            cells.append("   " + " / ".join(others))
        write("".join(cells))


def main(paths):
    summarize(records_from_json(paths))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/summarize.py results.json [more.json ...]")
    main(sys.argv[1:])
