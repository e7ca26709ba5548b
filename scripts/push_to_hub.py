#!/usr/bin/env python
"""Upload a MimCo checkpoint folder to the Hugging Face Hub in one commit.

The upload holds exactly what a user needs to load the model, with or without the `mimco` package:

* `config.json`, which must carry an `auto_map` (saved after `import modeling_mimco`);
* the weights (`*.safetensors`, and `model.safetensors.index.json` when sharded);
* the code files that `auto_map` names (`configuration_mimco.py`, `modeling_mimco.py`) and every module they import
  relatively, so that loading with `trust_remote_code` works;
* `preprocessor_config.json` (the `ViTImageProcessor`);
* `README.md`, the model card (`scripts/make_model_card.py`).

Anything else in the folder (optimizer states, pickles, logs) is left out and listed as such. A missing file stops
the script with a message naming it. `--dry_run` prints the file list and uploads nothing (no network call).

The token comes from the `HF_TOKEN` environment variable or the cached login (`hf auth login`), read by
huggingface_hub; it is never printed or written. Files that contain a Hugging Face token are refused.

Example:

```bash
python scripts/push_to_hub.py --checkpoint_dir outputs/mimco-vit-small --hub_model_id my-org/mimco-vit-small \
    --private --dry_run
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser


@dataclass
class PushArguments:
    """Arguments of `push_to_hub.py`."""

    checkpoint_dir: str = field(metadata={"help": "The checkpoint folder to upload."})
    hub_model_id: str = field(metadata={"help": "The repository to create or update, `namespace/name`."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    commit_message: str = field(default="Upload MimCo model", metadata={"help": "Message of the commit."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (default: main)."})
    dry_run: bool = field(default=False, metadata={"help": "List the files that would be uploaded; upload nothing."})


def push(args: PushArguments) -> list[str]:
    """Checks the folder, then uploads it (or, with `dry_run`, only lists it). Returns the uploaded file names."""
    from modeling_mimco import hub

    files, left_out = hub.collect_upload_files(args.checkpoint_dir)
    folder = Path(args.checkpoint_dir)
    verb = "Would upload" if args.dry_run else "Uploading"
    print(
        f"{verb} {len(files)} files from {folder} to {args.hub_model_id} ({'private' if args.private else 'public'}):"
    )
    for name in files:
        print(f"  {name}")
    if left_out:
        print(f"Left out ({len(left_out)}): {', '.join(left_out)}")
    if args.dry_run:
        hub.check_no_secrets(folder, files, hub.get_token())
        print("Dry run: nothing was uploaded.")
        return files
    commit = hub.push_checkpoint(
        folder,
        args.hub_model_id,
        private=args.private,
        commit_message=args.commit_message,
        revision=args.revision,
    )
    print(f"Committed: {getattr(commit, 'commit_url', commit)}")
    return files


def main(argv: list[str] | None = None) -> list[str]:
    parser = HfArgumentParser(PushArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        return push(args)
    except (ValueError, OSError) as error:  # huggingface_hub's HTTP errors are OSErrors too
        raise SystemExit(f"push_to_hub.py: error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
