#!/usr/bin/env python
"""`make demo`: a MimCo student from the shipped teacher and pixel MIM on built-in digits, then a frozen-feature
evaluation; CPU, no network.

The program lives in `modeling_mimco/experiments/demo.py`; `python scripts/demo.py --help` lists its flags.
"""

import sys

from modeling_mimco.experiments.demo import cli


if __name__ == "__main__":
    sys.exit(cli())
