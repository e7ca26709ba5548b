#!/usr/bin/env python
"""`make bench`: a MimCo stage-2 training step against its compute floor, a stock-transformers reference and the
machine's large-GEMM rate, and our data pipeline against `run_mim.py`'s, side by side in one process.

    OMP_NUM_THREADS=1 python scripts/benchmark.py --model_preset vit-small-patch16 --batch_size 16 --timer cpu
    python scripts/benchmark.py --device cuda --precision bf16 --batch_size 128 --torch_compile

The program lives in `modeling_mimco/benchmarks/benchmark.py` (what each variant measures is its docstring).
"""

import sys

from modeling_mimco.benchmarks.benchmark import cli


if __name__ == "__main__":
    sys.exit(cli())
