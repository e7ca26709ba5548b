#!/usr/bin/env python
"""Upload a MimCo checkpoint folder to the Hugging Face Hub in one commit.

The program lives in `modeling_mimco/commands/push_to_hub.py` and is installed as the `mimco-push` command; this file
runs it from a clone of the repository: `python scripts/push_to_hub.py --help`.
"""

import sys

from modeling_mimco.commands.push_to_hub import cli


if __name__ == "__main__":
    sys.exit(cli())
