#!/usr/bin/env python
"""The GPU check kit: correctness, throughput, data loading and a short reproduction on one CUDA GPU (<= 8 min).

The program lives in the package `modeling_mimco/benchmarks/gpu_check/`; this file runs it from a clone of the repository:

    python scripts/gpu_check.py                                   # on a GPU machine: outputs/gpu_check/report.md
    python scripts/gpu_check.py --smoke --output_dir /tmp/check   # every part on the CPU at tiny sizes (< 2 min)
    python scripts/gpu_check.py --help
"""

import sys

from modeling_mimco.benchmarks.gpu_check import cli


if __name__ == "__main__":
    sys.exit(cli())
