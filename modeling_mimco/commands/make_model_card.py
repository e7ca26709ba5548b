"""Write the model card (README.md) of a MimCo checkpoint folder: the `mimco-card` command.

The card is rendered from the Jinja2 template shipped in the package (`modeling_mimco/hub/templates/model_card.md`)
with `huggingface_hub.ModelCard.from_template` and filled from the folder's `config.json` and, optionally, a results
file. It gets YAML metadata (license, `library_name: transformers`, tags including `mimco` and `vision`,
`pipeline_tag` `image-feature-extraction` or `image-classification`, datasets, and a `model-index` with the
measured metrics), how to load the model with and without the `mimco` package, the training recipe, the evaluation
table, limitations and the MimCo citation. The snippets load the folder with the Auto class its `auto_map` names:
`AutoModel` for a backbone or a stage-2 pre-training folder (its student), `AutoModelForImageClassification` for a
classifier, `AutoModelForPreTraining` (two image views) for a stage-1 folder. The result is parsed back with
`huggingface_hub.ModelCard` before it is written. In a clone, `make cards` renders the committed cards of
`model_cards/` with this command (`model_cards/README.md`).

`--results_file` takes any of:

* the `linear_probe_results.json` of `mimco-probe`: the entry of this checkpoint is used (the one whose
  `model_name_or_path` is `--checkpoint_dir`, or whose name is the folder's name); `--results_model NAME` chooses
  another, and the error lists the names the file holds;
* the `eval_results.json` (or `all_results.json`) of `mimco-finetune`: `eval_accuracy` and `eval_top5_accuracy`
  become the fine-tuning top-1 / top-5; the file does not name its data, so `--dataset` is required;
* a results JSON in the card's own schema (every entry optional; accuracies in percent; a missing or null number is
  left out of the card):

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
settings read from `config.json`. Any other file is refused. `--dataset` / `--dataset_split` set or replace the
evaluation dataset of any of them. See `modeling_mimco/hub/model_card.py` for the full description.

Example:

```bash
mimco-card --checkpoint_dir outputs/mimco-vit-small --results_file outputs/probe/linear_probe_results.json \
    --hub_model_id my-org/mimco-vit-small
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling_mimco.commands import argument_parser, reports_errors, run_command
from modeling_mimco.hub.model_card import build_model_card, load_results


@dataclass
class ResultsArguments:
    """Where a card's numbers come from; shared by `mimco-card` and `mimco-push`."""

    results_file: str | None = field(
        default=None,
        metadata={
            "help": "linear_probe_results.json (mimco-probe), eval_results.json (mimco-finetune) or a results "
            "JSON in the card's schema."
        },
    )
    results_model: str | None = field(
        default=None,
        metadata={"help": "The entry of a linear_probe_results.json to use (default: the checkpoint's)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Evaluation dataset (Hub id or name); required with a fine-tuning eval_results.json."},
    )
    dataset_split: str | None = field(default=None, metadata={"help": "Split of the evaluation dataset."})

    def load(self, checkpoint_dir: str | Path) -> dict[str, Any] | None:
        """The results in the card's schema, or `None` without `--results_file`."""
        if self.results_file is None:
            if self.results_model or self.dataset or self.dataset_split:
                raise ValueError("--results_model, --dataset and --dataset_split need --results_file.")
            return None
        return load_results(
            self.results_file,
            checkpoint_dir=checkpoint_dir,
            model=self.results_model,
            dataset=self.dataset,
            dataset_split=self.dataset_split,
        )


@dataclass
class ModelCardArguments:
    """Arguments of `mimco-card`."""

    checkpoint_dir: str = field(metadata={"help": "The checkpoint folder (holds config.json)."})
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Repository id used in the card's code snippets (default: the folder's name)."},
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Where to write the card (default: <checkpoint_dir>/README.md)."}
    )
    template: str | None = field(
        default=None,
        metadata={"help": "A Jinja2 card template (default: the package's templates/model_card.md)."},
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the metadata (default: the results file's, or apache-2.0)."}
    )
    overwrite_output: bool = field(default=False, metadata={"help": "Replace an existing card."})


def make_model_card(args: ModelCardArguments, results_args: ResultsArguments | None = None) -> Path:
    """What `mimco-card` does with its parsed arguments: renders, validates and writes the card (refusing to
    replace one without `overwrite_output`); returns its path."""
    results_args = results_args or ResultsArguments()
    output_file = Path(args.output_file) if args.output_file else Path(args.checkpoint_dir) / "README.md"
    if output_file.exists() and not args.overwrite_output:
        raise ValueError(f"{output_file} exists; pass --overwrite_output to replace it.")
    results = results_args.load(args.checkpoint_dir) or {}
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
    source = f" from {results_args.results_file}" if results_args.results_file else ""
    print(f"Wrote the model card to {output_file} ({count} evaluation metric{'s' if count != 1 else ''}{source}).")
    if results_args.results_file and not count:
        # every number was null or absent: say so rather than publish a card that silently lacks them
        print(
            f"make_model_card.py: warning: {results_args.results_file} holds no evaluation numbers; the card has "
            "no evaluation results.",
            file=sys.stderr,
        )
    return output_file


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    parser = argument_parser((ModelCardArguments, ResultsArguments))
    args, results_args = parser.parse_args_into_dataclasses(args=argv)
    return make_model_card(args, results_args)


def cli() -> int:
    """The `mimco-card` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
