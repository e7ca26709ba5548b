#!/usr/bin/env python
"""Write the model card (README.md) of a MimCo checkpoint folder.

The card is rendered from the Jinja2 template `model_cards/template.md` with `huggingface_hub.ModelCard.from_template`
and filled from the folder's `config.json` and, optionally, a results JSON from the evaluation scripts. It gets YAML
metadata (license, `library_name: transformers`, tags including `mimco` and `vision`, `pipeline_tag`
`image-feature-extraction` or `image-classification`, datasets, and a `model-index` with the measured metrics), how to
load the model with and without the `mimco` package, the training recipe, the evaluation table, limitations and the
MimCo citation. The result is parsed back with `huggingface_hub.ModelCard` before it is written.

Results JSON (every entry optional; accuracies in percent; a missing or null number is left out of the card):

```json
{
  "model_name": "mimco-vit-small-patch16-224",
  "dataset": {"id": "ILSVRC/imagenet-1k", "name": "ImageNet-1k", "split": "validation"},
  "results": {"linear_probe_top1": 70.1, "linear_probe_top5": 89.9, "knn_top1": 64.2, "knn_top5": 84.0,
              "finetune_top1": 82.5, "finetune_top5": 96.1},
  "pretraining": {"teacher": "MoCo v3 ViT-S/16", "dataset": "ILSVRC/imagenet-1k", "epochs": 100},
  "license": "apache-2.0",
  "base_model": "org/teacher-model"
}
```

`dataset` may also be a plain Hub id string. `pretraining` is free-form and listed in the training recipe after the
settings read from `config.json`. See `modeling_mimco/hub.py` for the full description.

Example:

```bash
python scripts/make_model_card.py --checkpoint_dir outputs/mimco-vit-small --results_file outputs/results.json \
    --hub_model_id my-org/mimco-vit-small
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser


@dataclass
class ModelCardArguments:
    """Arguments of `make_model_card.py`."""

    checkpoint_dir: str = field(metadata={"help": "The checkpoint folder (holds config.json)."})
    results_file: str | None = field(
        default=None, metadata={"help": "Results JSON from the evaluation scripts (schema in the docstring)."}
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Repository id used in the card's code snippets (default: the folder's name)."},
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Where to write the card (default: <checkpoint_dir>/README.md)."}
    )
    template: str | None = field(
        default=None, metadata={"help": "A Jinja2 card template (default: model_cards/template.md)."}
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the metadata (default: the results file's, or apache-2.0)."}
    )
    overwrite_output: bool = field(default=False, metadata={"help": "Replace an existing card."})


def make_card(args: ModelCardArguments) -> Path:
    """Renders, validates and writes the card; returns its path."""
    from modeling_mimco.hub import build_model_card, load_results

    output_file = Path(args.output_file) if args.output_file else Path(args.checkpoint_dir) / "README.md"
    if output_file.exists() and not args.overwrite_output:
        raise ValueError(f"{output_file} exists; pass --overwrite_output to replace it.")
    results = load_results(args.results_file) if args.results_file else {}
    card = build_model_card(
        args.checkpoint_dir,
        results,
        repo_id=args.hub_model_id,
        template_path=args.template,
        card_license=args.license,
    )
    output_file.parent.mkdir(parents=True, exist_ok=True)
    card.save(output_file)
    count = len(card.data.eval_results or [])
    print(f"Wrote the model card to {output_file} ({count} evaluation metric{'s' if count != 1 else ''}).")
    return output_file


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser(ModelCardArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        return make_card(args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"make_model_card.py: error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
