#!/usr/bin/env python
"""Write a folder of class sub-folders as WebDataset shards for `--data_files 'shards/train-{000000..000099}.tar'`.

The program lives in `modeling_mimco/commands/make_shards.py` and is installed as the `mimco-make-shards` command;
this file runs it from a clone of the repository: `python scripts/make_shards.py --help`.
"""

import sys

from modeling_mimco.commands.make_shards import cli


if __name__ == "__main__":
    sys.exit(cli())
