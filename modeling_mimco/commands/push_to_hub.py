"""Upload a MimCo checkpoint folder to the Hugging Face Hub in one commit: the `mimco-push` command.

It runs `modeling_mimco.hub.upload.push_to_hub`, the same function as the pre-training loop's `--push_to_hub`. The upload
holds exactly what a user needs to load the model, with or without the `mimco` package:

* `config.json`, which must carry an `auto_map` (saved after `import modeling_mimco`);
* the weights (`*.safetensors`, and `model.safetensors.index.json` when sharded);
* the code files that `auto_map` names (`configuration_mimco.py`, `modeling_mimco.py`) and every module they import
  relatively, so that loading with `trust_remote_code` works;
* `preprocessor_config.json` (the `ViTImageProcessor`);
* `README.md`, the model card: when the folder has none, it is generated as `mimco-card` would (with the numbers of
  `--results_file`, see `mimco-card --help`) and written into the folder just before the commit.

Anything else in the folder (optimizer states, pickles, logs) is left out and listed as such. A missing file stops
the command with a message naming it. `--dry_run` prints the file list, runs every check and uploads nothing (no
network call, no file written).

The token comes from the `HF_TOKEN` environment variable or the cached login (`hf auth login`), read by
huggingface_hub; it is never printed or written. Files that contain a Hugging Face token are refused. The Hub
address is huggingface_hub's (`HF_ENDPOINT`).

Example:

```bash
mimco-push --checkpoint_dir outputs/mimco-vit-small --hub_model_id my-org/mimco-vit-small --private --dry_run
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from huggingface_hub import CommitInfo

from modeling_mimco.commands import argument_parser, reports_errors, run_command
from modeling_mimco.commands.make_model_card import ResultsArguments
from modeling_mimco.hub import upload


@dataclass
class PushArguments:
    """Arguments of `mimco-push`."""

    checkpoint_dir: str = field(metadata={"help": "The checkpoint folder to upload."})
    hub_model_id: str = field(metadata={"help": "The repository to create or update, `namespace/name`."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    commit_message: str = field(default=upload.DEFAULT_COMMIT_MESSAGE, metadata={"help": "Message of the commit."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (default: main)."})
    dry_run: bool = field(default=False, metadata={"help": "List the files that would be uploaded; upload nothing."})


def push(args: PushArguments, results_args: ResultsArguments | None = None) -> CommitInfo | None:
    """What `mimco-push` does with its parsed arguments: checks the folder, then uploads it (or, with `dry_run`,
    only lists it). Returns the `CommitInfo` (`None` for a dry run)."""
    results = (results_args or ResultsArguments()).load(args.checkpoint_dir)
    return upload.push_to_hub(
        args.checkpoint_dir,
        args.hub_model_id,
        private=args.private,
        commit_message=args.commit_message,
        revision=args.revision,
        results=results,
        dry_run=args.dry_run,
    )


@reports_errors
def main(argv: list[str] | None = None) -> CommitInfo | None:
    parser = argument_parser((PushArguments, ResultsArguments))
    args, results_args = parser.parse_args_into_dataclasses(args=argv)
    return push(args, results_args)


def cli() -> int:
    """The `mimco-push` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
