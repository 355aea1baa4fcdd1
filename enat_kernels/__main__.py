"""python -m enat_kernels [--check | --bench]: what runs here, and whether it is right (enat_kernels.info).

Without a flag: versions, the extension's build, the device, Triton's mode and the backend of each op
at the model's shapes. --check: every op on every backend that can run here against plain PyTorch in
float64, within the tests' error budgets; exits 1 on any failure. --bench: GPU time of each op beside
the PyTorch calls it replaces, at the shapes of an ENAT-L generation.

Triton's interpreter (TRITON_INTERPRET=1) must be chosen before triton is imported, which importing
enat_kernels does; so on a machine without a GPU, --check restarts itself with TRITON_INTERPRET=1
unless the variable is already set (TRITON_INTERPRET=0 leaves the Triton kernels unchecked).
"""

import argparse
import os
import sys

import torch

from . import info, triton_utils


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m enat_kernels",
        description="What runs here (versions, build, device, the backend of each op), and whether it is right.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="check every op on every backend that can run here against float64 PyTorch, "
                           "forward and backward, in fp32, bf16 and fp16; exit 1 on any failure")
    mode.add_argument("--bench", action="store_true",
                      help="GPU time of each op beside the PyTorch calls it replaces, at ENAT-L generation shapes")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.check:
        if (not torch.cuda.is_available() and triton_utils.triton is not None
                and "TRITON_INTERPRET" not in os.environ):
            print("No GPU: restarting with TRITON_INTERPRET=1 so that the Triton kernels are checked in the "
                  "interpreter.", flush=True)
            os.execve(sys.executable, [sys.executable, "-m", "enat_kernels", *(sys.argv[1:] if argv is None else argv)],
                      {**os.environ, "TRITON_INTERPRET": "1"})
        return info.run_check()
    if args.bench:
        return info.bench()
    info.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
