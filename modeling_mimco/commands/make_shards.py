"""Write a folder of class sub-folders (ImageNet's `train/<wnid>/<image>.JPEG`) as WebDataset shards: the
`mimco-make-shards` command.

Each shard `OUTPUT/train-NNNNNN.tar` holds samples `KEY.jpg` (the file's bytes, not re-encoded) + `KEY.cls` (the
class index, classes in sorted order, listed in `OUTPUT/classes.txt`), spread round-robin so that every shard holds
every class. The command prints the `--data_files` pattern to train on, e.g. `OUTPUT/train-{000000..000099}.tar`.
A file that is no image, or whose header gives more than `--max_image_pixels` pixels, is left out with a warning
naming it (its header is read, nothing is decoded).

Example:

```bash
mimco-make-shards --train_dir /data/imagenet/train --output_dir /data/shards --num_shards 128
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from modeling_mimco.commands import argument_parser, reports_errors, run_command
from modeling_mimco.data.arguments import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class ShardArguments:
    """What to write as shards, and how many."""

    train_dir: str = field(metadata={"help": "A folder with one sub-folder per class."})
    output_dir: str = field(metadata={"help": "Where the shards go."})
    shard_size: int = field(default=1000, metadata={"help": "Images per shard (unless --num_shards is given)."})
    num_shards: int | None = field(
        default=None,
        metadata={"help": "Exactly this many shards; a multiple of processes x DataLoader workers splits evenly."},
    )
    prefix: str = field(default="train", metadata={"help": "Shard names: PREFIX-000000.tar, ..."})
    max_image_pixels: int | None = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Leave out (named) every image whose header gives more pixels (width x height) than this, as the "
            "training commands' --max_image_pixels would skip it; 0 for no limit. Default: PIL's "
            "Image.MAX_IMAGE_PIXELS."
        },
    )
    max_samples: int | None = field(
        default=None,
        metadata={
            "help": "Write a subset of N images, drawn with --seed before any file is read (kept in class order; "
            "classes.txt still lists every class)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Draws the --max_samples subset."})


def make_shards(args: ShardArguments) -> str:
    """Writes the shards and returns the brace pattern that names them for `--data_files`."""
    from modeling_mimco.data.webdataset import shard_pattern, write_shards  # torch and the decoders: not for --help

    paths = write_shards(
        args.train_dir,
        args.output_dir,
        args.shard_size,
        args.prefix,
        args.num_shards,
        args.max_image_pixels,
        max_samples=args.max_samples,
        seed=args.seed,
    )
    return shard_pattern(paths)


@reports_errors
def main(argv: list[str] | None = None) -> str:
    (args,) = argument_parser(ShardArguments).parse_args_into_dataclasses(args=argv)
    pattern = make_shards(args)
    print(f"Wrote {pattern}; train with --data_files '{pattern}' --streaming")
    return pattern


def cli() -> int:
    """The `mimco-make-shards` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
