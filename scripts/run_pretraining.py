#!/usr/bin/env python
"""Stage 2 of MimCo: pre-train a ViT student by masked image modeling against a frozen contrastive teacher.

The program lives in `modeling_mimco/commands/run_pretraining.py` and is installed as the `mimco-pretrain` command;
this file runs it from a clone of the repository: `python scripts/run_pretraining.py --help`.
"""

import sys

from modeling_mimco.commands.run_pretraining import cli


if __name__ == "__main__":
    sys.exit(cli())
