#!/usr/bin/env python
"""The dense-transfer study on the synthetic digit-canvas segmentation set (docs/results.md).

The study lives in `modeling_mimco/experiments/dense_transfer.py`; this file runs it from a clone of the repository:
`python scripts/dense_transfer.py --help`.
"""

import sys

from modeling_mimco.experiments.dense_transfer import cli


if __name__ == "__main__":
    sys.exit(cli())
