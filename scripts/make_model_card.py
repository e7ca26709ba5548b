#!/usr/bin/env python
"""Write the model card (README.md) of a MimCo checkpoint folder.

The program lives in `modeling_mimco/commands/make_model_card.py` and is installed as the `mimco-card` command; this
file runs it from a clone of the repository: `python scripts/make_model_card.py --help`.
"""

import sys

from modeling_mimco.commands.make_model_card import cli


if __name__ == "__main__":
    sys.exit(cli())
