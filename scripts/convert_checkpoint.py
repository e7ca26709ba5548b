#!/usr/bin/env python
"""Convert Vision Transformer checkpoints to and from MimCo.

The program lives in `modeling_mimco/commands/convert_checkpoint.py` and is installed as the `mimco-convert` command;
this file runs it from a clone of the repository: `python scripts/convert_checkpoint.py --help`.
"""

import sys

from modeling_mimco.commands.convert_checkpoint import cli


if __name__ == "__main__":
    sys.exit(cli())
