#!/usr/bin/env python
"""Frozen-feature evaluation: linear probe and weighted k-NN accuracy of one or several backbones.

The program lives in `modeling_mimco/commands/run_linear_probe.py` and is installed as the `mimco-probe` command; this
file runs it from a clone of the repository: `python scripts/run_linear_probe.py --help`.
"""

import sys

from modeling_mimco.commands.run_linear_probe import cli


if __name__ == "__main__":
    sys.exit(cli())
