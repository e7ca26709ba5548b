#!/usr/bin/env python
"""`make reproduce`: MimCo's claim at small scale, the comparison table on CIFAR-10, one command, on CPUs.

    python scripts/reproduce.py                          # the default 90-minute budget (2 CPU cores)
    python scripts/reproduce.py --smoke                  # every row end to end on a few hundred images
    python scripts/reproduce.py --help                   # rows, columns, budget and every flag

The program lives in `modeling_mimco/experiments/reproduction.py` and the `reproduction_*.py` modules beside it.
From a clone, the default data is the CIFAR-10 copy (Hub `uoft-cs/cifar10` layout) in `shared/datasets/cifar10`
beside the repository, when it is there.
"""

import os
import sys

from modeling_mimco.experiments.reproduction import cli


LOCAL_CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "cifar10")


if __name__ == "__main__":
    sys.exit(cli(local_dataset=LOCAL_CIFAR10))
