"""Resources of the CUDA kernels of enat_kernels._C on each GPU architecture, from ptxas, without a GPU.

    python scripts/cuda_resources.py [--archs 80,90] [--json]

nvcc compiles scripts/cuda_resources.cu (every kernel of csrc/cuda, without the torch launchers) for
each architecture with the flags setup.py builds the extension with and `-Xptxas -v`: registers, spill
stores and loads, static shared memory per kernel. The program it builds (it needs no GPU) prints the
dynamic shared memory each launcher requests, and evaluates the attention's tile plan for the model's
own q/k/v views. The kept PTX and cubins give each kernel's block size, its mma.sync instructions and,
with cuobjdump (the CUDA toolkit's or Triton's), its HMMA instructions. Prints the markdown tables of
docs/OPS.md ("CUDA kernels: resources"), or JSON; tests/test_gpu_targets_cuda.py checks the limits.
"""

import argparse
import ast
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "scripts" / "cuda_resources.cu"
ARCHS = (80, 90)
# Shared memory one block may use (bytes, with the opt-in the launcher requests): sm_80 163 KiB,
# sm_90 227 KiB (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
SMEM_PER_BLOCK = {80: 166_912, 90: 232_448}
MAX_REGISTERS = 255

def setup_nvcc_flags():
    """setup.py's NVCC_FLAGS (read, not run: running setup.py builds)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError("setup.py defines no NVCC_FLAGS")


# The extension's nvcc flags: setup.py's, and those torch's CUDAExtension adds (the C++ standard,
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
NVCC_FLAGS = [*setup_nvcc_flags(), "-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
# The model sizes whose attention layouts get a tile plan.
MODELS = ("ENAT-S", "ENAT-B", "ENAT-L")


def find_tool(name, *extra_dirs):
    """Path of a CUDA tool: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin, then extra_dirs."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    dirs = [os.path.join(h, "bin") for h in homes if h]
    for d in dirs:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    for d in (None, "/usr/local/cuda/bin", *extra_dirs):
        found = shutil.which(name, path=d)
        if found:
            return found
    return None


def find_cuobjdump():
    """The CUDA toolkit's cuobjdump, else the one Triton ships, or None."""
    try:
        import triton
        triton_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    except ImportError:
        triton_bin = None
    return find_tool("cuobjdump", *([triton_bin] if triton_bin else []))


def short_name(demangled):
    """'void enat::attention::attn_tc_kernel<__half, 64, 8>(...)' -> 'attn_tc_kernel<__half, 64, 8>'."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    base, _, args = name.partition("<")
    return base.rsplit("::", 1)[-1] + (f"<{args}" if args else "")


def demangle(names):
    """{mangled: short name} through c++filt."""
    names = sorted(set(names))
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, (short_name(line) for line in out.stdout.splitlines())))


def parse_ptxas(log):
    """{mangled kernel: {registers, spill_stores, spill_loads, stack, static_smem}} from `ptxas -v`."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"static_smem": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(smem.group(1)) if smem else 0
    return kernels


def parse_ptx(ptx):
    """{mangled kernel: {threads, mma, cp_async}} from PTX: .maxntid, mma.sync m16n8k16 count, cp.async sizes."""
    kernels = {}
    cp_size = r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(\d+)"
    for chunk in re.split(r"(?m)^\s*\.visible\s+\.entry\s+|^\s*\.entry\s+", ptx)[1:]:
        name = re.match(r"(\w+)", chunk).group(1)
        threads = re.search(r"\.maxntid\s+(\d+)", chunk)
        kernels[name] = {
            "threads": int(threads.group(1)) if threads else None,
            "mma": len(re.findall(r"mma\.sync\.aligned\.m16n8k16", chunk)),
            "cp_async": sorted({int(s) for s in re.findall(cp_size, chunk)}, reverse=True),
        }
    return kernels


def parse_sass(sass):
    """{mangled kernel: HMMA instruction count} from `cuobjdump -sass`."""
    counts, current = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            counts[current] = 0
        elif current is not None and re.search(r"\bHMMA\.", line):
            counts[current] += 1
    return counts


def compile_arch(nvcc, arch, workdir):
    """Builds the resource program for sm_<arch>; returns (ptxas log, its folder)."""
    folder = Path(workdir) / f"sm_{arch}"
    folder.mkdir()
    cmd = [nvcc, f"-gencode=arch=compute_{arch},code=sm_{arch}", *NVCC_FLAGS, "-Xptxas", "-v", "-keep",
           "-keep-dir", str(folder), "-I", str(ROOT / "csrc"), str(SOURCE), "-o", str(folder / "cuda_resources")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed for sm_{arch}:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr, folder


def model_layouts():
    """[(label, five (address, sizes, strides) of q, k_ctx, v_ctx, k_self, v_self)]: each model size's
    attention inputs as enat.model.Attention makes them (views of the fused projections, on CPU tensors,
    whose addresses are 64-byte aligned like a GPU allocation's), and contiguous (B, H, L, D) tensors."""
    sys.path.insert(0, str(ROOT))
    import torch
    from enat.config import config
    from enat.model import Attention

    B, Lq, Lc = 2, 80, 48
    cases = []
    for name in MODELS:
        cfg = config(name)
        attn = Attention(cfg.width, cfg.heads)
        q, k_self, v_self = attn._heads(torch.empty(B, Lq, 3 * cfg.width, dtype=torch.float16), 3)
        k_ctx, v_ctx = attn._heads(torch.empty(B, Lc, 2 * cfg.width, dtype=torch.float16), 2)
        cases.append((f"{name} (D = {cfg.head_dim}), the model's views", (q, k_ctx, v_ctx, k_self, v_self)))
    for D in (61, 64):
        q, k_ctx, v_ctx = (torch.empty(B, 6, L, D, dtype=torch.float16) for L in (Lq, Lc, Lc))
        k_self, v_self = (torch.empty(B, 6, Lq, D, dtype=torch.float16) for _ in range(2))
        cases.append((f"contiguous (B, H, L, {D})", (q, k_ctx, v_ctx, k_self, v_self)))
    return [(label, [(t.data_ptr(), tuple(t.shape), t.stride()) for t in ts]) for label, ts in cases]


def tile_plans(program, layouts):
    """[(label, copy width, D_PAD)] from the resource program's `plan` mode (attention::plan_tc)."""
    lines = [" ".join(f"{addr} {' '.join(map(str, size))} {' '.join(map(str, stride))}" for addr, size, stride in ts)
             for _, ts in layouts]
    out = subprocess.run([str(program), "plan"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True)
    return [(label, *map(int, line.split())) for (label, _), line in zip(layouts, out.stdout.splitlines())]


def measure(archs=ARCHS, nvcc=None):
    """{"kernels": {short name: {sm_<arch>: resources}}, "plans": [...], "sass": bool} for every kernel."""
    nvcc = nvcc or find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    cuobjdump = find_cuobjdump()
    with tempfile.TemporaryDirectory(prefix="cuda_resources_") as workdir:
        with concurrent.futures.ThreadPoolExecutor(len(archs)) as pool:
            builds = dict(zip(archs, pool.map(lambda a: compile_arch(nvcc, a, workdir), archs)))
        program = builds[archs[0]][1] / "cuda_resources"
        dynamic = {}  # "smem <kernel> <bytes>" lines
        for line in subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout.splitlines():
            name, size = line.removeprefix("smem ").rsplit(" ", 1)
            dynamic[name] = int(size)
        plans = tile_plans(program, model_layouts())
        per_arch = {}
        for arch, (log, folder) in builds.items():
            ptx = parse_ptx((folder / "cuda_resources.ptx").read_text())
            sass = None
            if cuobjdump:
                cubin = next(c for c in (folder / "cuda_resources.cubin", folder / f"cuda_resources.sm_{arch}.cubin")
                             if c.exists())  # the name nvcc keeps it under differs with -gencode and -arch
                sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                                 check=True).stdout)
            per_arch[arch] = (parse_ptxas(log), ptx, sass)
    names = demangle(n for res, _, _ in per_arch.values() for n in res)
    kernels = {}
    for arch, (res, ptx, sass) in per_arch.items():
        for mangled, r in res.items():
            name = names[mangled]
            entry = dict(r, dynamic_smem=dynamic.get(name, 0), **ptx.get(mangled, {}),
                         hmma=None if sass is None else sass.get(mangled, 0))
            kernels.setdefault(name, {})[f"sm_{arch}"] = entry
    def natural(name):  # attn_tc_kernel<__half, 32, 4> before attn_tc_kernel<__half, 128, 4>
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    kernels = dict(sorted(kernels.items(), key=lambda item: natural(item[0])))
    return {"kernels": kernels, "plans": plans, "sass": cuobjdump is not None}


def markdown(result):
    """The two tables of docs/OPS.md, "CUDA kernels: resources"."""
    archs = sorted({a for k in result["kernels"].values() for a in k})
    per = " / ".join(archs)
    lines = [f"| kernel | threads | registers ({per}) | spill stores + loads, bytes | shared memory, static + dynamic "
             f"(bytes) | mma.sync m16n8k16 in PTX | HMMA in SASS | cp.async sizes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_arch in result["kernels"].items():
        first = by_arch[archs[0]]

        def each(f):
            return " / ".join(str(f(by_arch[a])) for a in archs)

        hmma = each(lambda r: r["hmma"]) if result["sass"] else "(no cuobjdump)"
        lines.append(
            f"| `{name}` | {first['threads']} | {each(lambda r: r['registers'])} | "
            f"{each(lambda r: r['spill_stores'] + r['spill_loads'])} | {first['static_smem']:,} + "
            f"{first['dynamic_smem']:,} | {each(lambda r: r['mma'])} | {hmma} | "
            f"{', '.join(map(str, first['cp_async'])) or '-'} |")
    lines += ["", "| attention inputs | copy width, bytes | D_PAD |", "|---|---|---|"]
    for label, width, d_pad in result["plans"]:
        lines.append(f"| {label} | {width if width > 2 else '2 (element-wise, synchronous)'} | {d_pad} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    result = measure(tuple(int(a) for a in args.archs.split(",")))
    print(json.dumps(result, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
