#!/usr/bin/env python
"""Stage 1 of MimCo: pre-train the contrastive teacher (MoCo v3 for ViTs).

The program lives in `modeling_mimco/commands/run_contrastive_pretraining.py` and is installed as the
`mimco-contrastive` command; this file runs it from a clone of the repository: `python
scripts/run_contrastive_pretraining.py --help`.
"""

import sys

from modeling_mimco.commands.run_contrastive_pretraining import cli


if __name__ == "__main__":
    sys.exit(cli())
