#!/usr/bin/env python
"""Semantic segmentation with UperNet on a MimCo backbone, trained with `transformers.Trainer`.

The program lives in `modeling_mimco/commands/run_semantic_segmentation.py` and is installed as the `mimco-segment`
command; this file runs it from a clone of the repository: `python scripts/run_semantic_segmentation.py --help`.
"""

import sys

from modeling_mimco.commands.run_semantic_segmentation import cli


if __name__ == "__main__":
    sys.exit(cli())
