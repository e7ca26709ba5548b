"""The model card of a MimCo checkpoint folder: the results files a card's numbers come from, and the card itself.

This module owns the card's results schema (reading the three kinds of results file below, and validating them),
the card's metadata (tags, pipeline tag, datasets, `model-index`), its evaluation table, training recipe and
citation, and the rendering of the Jinja2 template shipped in `modeling_mimco/hub/templates/model_card.md`, checked by
parsing the result back with `huggingface_hub.ModelCard`. `mimco-card` (`commands/make_model_card.py`) writes the
card; `modeling_mimco.hub.upload` generates it for a folder that has none before an upload. It imports the standard
library, `huggingface_hub`, `safetensors` and, of the package, only the model file's `PRETRAINING_ONLY_PREFIXES`
(when it counts a checkpoint's parameters, so that `mimco-card --help` and `mimco-push --help` need no torch).

Results file
------------
A card is filled from a checkpoint folder's `config.json` and, optionally, a results JSON. `load_results` reads
three kinds of file and turns each into the card's own schema:

1. The card's schema (every entry optional):

```json
{
  "model_name": "mimco-vit-small-patch16-224",
  "dataset": {"id": "ILSVRC/imagenet-1k", "name": "ImageNet-1k", "split": "validation", "config": null},
  "results": {
    "linear_probe_top1": 70.1, "linear_probe_top5": 89.9,
    "knn_top1": 64.2, "knn_top5": 84.0,
    "finetune_top1": 82.5, "finetune_top5": 96.1
  },
  "pretraining": {"teacher": "MoCo v3 ViT-S/16", "dataset": "ILSVRC/imagenet-1k", "epochs": 100, "...": "..."},
  "license": "apache-2.0",
  "base_model": "org/teacher-model"
}
```

* `dataset` is the evaluation dataset: a Hub id string, or an object with `id` (Hub id or any identifier), `name`
  (display name, defaults to the id), `split` and `config`.
* `results` holds accuracies **in percent**, under the keys of `RESULT_METRICS`. A number that is absent or `null`
  is simply left out of the card; an unknown key is an error (a typo would otherwise vanish silently), and so is an
  unknown top-level key.
* `pretraining` is free-form `{name: value}`: it is listed, after the fields read from `config.json`, in the card's
  training recipe.

2. `linear_probe_results.json` of `mimco-probe` (`run_linear_probe.py`): `dataset`, `eval_split` and a `models` list
   whose entries hold `name`, `model_name_or_path` and the fractions `linear_probe_top1` and `knn_top1`. The entry
   of the checkpoint is the one whose `model_name_or_path` is the checkpoint folder (or, when that path cannot be
   checked from here, whose name is the folder's name); `model=` (`--results_model`) picks one by name instead.
3. The `eval_results.json` (or `all_results.json`) that the `Trainer` of `mimco-finetune` writes: the fractions
   `eval_accuracy` and `eval_top5_accuracy`. It does not name its data, so the dataset must be given
   (`dataset=`, `--dataset`).
4. The `eval_results.json` (or `all_results.json`) of `mimco-segment`: the fractions `eval_mean_iou`,
   `eval_mean_accuracy` and `eval_overall_accuracy` (the card's `segmentation_*` results); the dataset must be
   given as for fine-tuning.

Fractions are turned into percent. Any other file is refused with a message naming it.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


# Read through importlib.resources, so that the template is found in an installed wheel, an editable install or a
# zip import alike (a `Path(__file__)` expression only works when the package is a plain folder).
DEFAULT_TEMPLATE = package_files("modeling_mimco.hub") / "templates" / "model_card.md"

# results key -> (evaluation protocol as the card names it, top-k)
RESULT_METRICS = {
    "linear_probe_top1": ("Linear probe", 1),
    "linear_probe_top5": ("Linear probe", 5),
    "knn_top1": ("k-NN", 1),
    "knn_top5": ("k-NN", 5),
    "finetune_top1": ("Fine-tuning", 1),
    "finetune_top5": ("Fine-tuning", 5),
}
# results key -> what the card calls the segmentation metric (`mimco-segment`, UperNet)
SEGMENTATION_METRICS = {
    "segmentation_mean_iou": "mean IoU",
    "segmentation_mean_accuracy": "mean accuracy",
    "segmentation_pixel_accuracy": "pixel accuracy",
}
# Trainer metric (fraction) of `mimco-segment` -> results key (percent)
SEGMENTATION_TRAINER_METRICS = {
    "eval_mean_iou": "segmentation_mean_iou",
    "eval_mean_accuracy": "segmentation_mean_accuracy",
    "eval_overall_accuracy": "segmentation_pixel_accuracy",
}
# The top-level keys of the card's results schema.
RESULTS_KEYS = ("model_name", "dataset", "results", "pretraining", "license", "base_model")
LINEAR_PROBE_RESULTS_NAME = "linear_probe_results.json"
# Trainer metric (fraction) -> results key (percent)
FINETUNE_METRICS = {"eval_accuracy": "finetune_top1", "eval_top5_accuracy": "finetune_top5"}
# linear-probe entry field (fraction) -> results key (percent)
LINEAR_PROBE_METRICS = {"linear_probe_top1": "linear_probe_top1", "knn_top1": "knn_top1"}

MIMCO_CITATION = """@inproceedings{zhou2022mimco,
  title     = {MimCo: Masked Image Modeling Pre-training with Contrastive Teacher},
  author    = {Zhou, Qiang and Yu, Chaohui and Luo, Hao and Wang, Zhibin and Li, Hao},
  booktitle = {Proceedings of the 30th ACM International Conference on Multimedia (ACM MM)},
  year      = {2022},
  eprint    = {2209.03063},
  archivePrefix = {arXiv}
}"""

CARD_TAGS = ["mimco", "vision", "vit", "self-supervised-learning", "masked-image-modeling"]


# ------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class EvaluationDataset:
    id: str
    name: str
    split: str | None = None
    config: str | None = None


def load_results(
    path: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    model: str | None = None,
    dataset: str | None = None,
    dataset_split: str | None = None,
) -> dict[str, Any]:
    """Reads a results JSON of any of the kinds in this module's docstring and returns it in the card's schema,
    validated. Raises `ValueError` naming the file and the entry that is wrong.

    `checkpoint_dir` and `model` choose the entry of a linear-probe file; `dataset` (a Hub id or any identifier) and
    `dataset_split` set or replace the evaluation dataset (a fine-tuning eval file needs them).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such results file.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    source = str(path)
    kind = results_kind(data, source)
    if kind == "linear_probe":
        results = _from_linear_probe(data, source, checkpoint_dir, model)
    elif kind == "finetune":
        results = _from_finetune(data, source, dataset)
    elif kind == "segmentation":
        results = _from_segmentation(data, source, dataset)
    else:
        results = dict(data)
        if model is not None:
            raise ValueError(f"{source}: `model` (--results_model) only applies to a {LINEAR_PROBE_RESULTS_NAME}.")
    if dataset is not None or dataset_split is not None:
        results["dataset"] = _override_dataset(results.get("dataset"), dataset, dataset_split, source)
    validate_results(results, source)
    return results


def results_kind(data: Any, source: str = "results") -> str:
    """`"card"`, `"linear_probe"`, `"finetune"` or `"segmentation"`: which of the schemas in this module's docstring `data` follows.
    Raises `ValueError` (one line, naming `source`) for anything else."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, got {type(data).__name__}.")
    if isinstance(data.get("models"), list):
        return "linear_probe"
    if "eval_accuracy" in data:
        return "finetune"
    if "eval_mean_iou" in data:
        return "segmentation"
    unknown = sorted(set(data) - set(RESULTS_KEYS))
    if not unknown:
        return "card"
    raise ValueError(
        f"{source}: unknown results schema (unexpected keys: {', '.join(unknown)}); expected the model-card results "
        f"schema (keys {', '.join(RESULTS_KEYS)}), a linear probe's {LINEAR_PROBE_RESULTS_NAME} (a `models` list) "
        "or a fine-tuning eval_results.json / all_results.json (with `eval_accuracy`, or `eval_mean_iou` for "
        "segmentation)."
    )


def _percent(value: Any, where: str) -> float | None:
    """A fraction in [0, 1] as percent; `None` stays `None`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where} must be an accuracy between 0 and 1 (a fraction), got {value!r}.")
    # rounded so that float noise (71.23000000000001) does not reach the card's metadata
    return round(100.0 * float(value), 4)


def _same_checkpoint(entry: dict[str, Any], checkpoint_dir: Path) -> bool:
    """Whether a linear-probe entry measured `checkpoint_dir`: the same folder when its path can be checked from
    here, else the same folder name (the probe may have run from another working directory)."""
    path = entry.get("model_name_or_path")
    if isinstance(path, str) and Path(path).exists() and checkpoint_dir.exists():
        return os.path.samefile(path, checkpoint_dir)
    folder_name = checkpoint_dir.resolve().name
    names = {entry.get("name")}
    if isinstance(path, str):
        names.add(Path(path).name)
    return folder_name in names


def select_linear_probe_entry(
    models: list[Any], source: str, checkpoint_dir: str | Path | None = None, model: str | None = None
) -> dict[str, Any]:
    """The entry of a linear-probe results file for `model` (a `name` or `model_name_or_path`) or, without it, for
    `checkpoint_dir`. Raises `ValueError` listing the names the file holds when there is not exactly one."""
    entries = [entry for entry in models if isinstance(entry, dict)]
    if len(entries) != len(models):
        raise ValueError(f"{source}: every entry of `models` must be an object.")
    listing = ", ".join(repr(str(entry.get("name"))) for entry in entries) or "none"
    if model is not None:
        hits = [entry for entry in entries if entry.get("name") == model]
        hits = hits or [entry for entry in entries if entry.get("model_name_or_path") == model]
        if not hits:
            raise ValueError(f"{source}: no model named {model!r}; the file holds: {listing}.")
        return hits[0]
    hits = (
        [] if checkpoint_dir is None else [entry for entry in entries if _same_checkpoint(entry, Path(checkpoint_dir))]
    )
    if len(hits) == 1:
        return hits[0]
    which = "several" if hits else "none"
    raise ValueError(
        f"{source}: holds linear-probe results for {len(entries)} model(s) ({listing}), {which} of which is the "
        f"checkpoint {checkpoint_dir}; choose one with --results_model NAME."
    )


def _from_linear_probe(
    report: dict[str, Any], source: str, checkpoint_dir: str | Path | None, model: str | None
) -> dict[str, Any]:
    entry = select_linear_probe_entry(report["models"], source, checkpoint_dir, model)
    name = entry.get("name")
    metrics = {
        key: _percent(entry.get(field_name), f"{source}: models[{name!r}].{field_name}")
        for field_name, key in LINEAR_PROBE_METRICS.items()
    }
    if all(value is None for value in metrics.values()):
        raise ValueError(f"{source}: models[{name!r}] holds neither linear_probe_top1 nor knn_top1.")
    results: dict[str, Any] = {"results": metrics}
    dataset = report.get("dataset")
    if isinstance(dataset, list):  # --data_files
        dataset = ", ".join(str(item) for item in dataset)
    if dataset:
        results["dataset"] = {"id": str(dataset), "split": report.get("eval_split")}
    return results


def _from_finetune(metrics: dict[str, Any], source: str, dataset: str | None) -> dict[str, Any]:
    if dataset is None:
        raise ValueError(
            f"{source}: a fine-tuning eval file does not name its evaluation data; pass the dataset (--dataset)."
        )
    return {
        "results": {key: _percent(metrics.get(name), f"{source}: {name}") for name, key in FINETUNE_METRICS.items()}
    }


def _from_segmentation(metrics: dict[str, Any], source: str, dataset: str | None) -> dict[str, Any]:
    if dataset is None:
        raise ValueError(
            f"{source}: a segmentation eval file does not name its evaluation data; pass the dataset (--dataset)."
        )
    return {
        "results": {
            key: _percent(metrics.get(name), f"{source}: {name}") for name, key in SEGMENTATION_TRAINER_METRICS.items()
        }
    }


def _override_dataset(current: Any, dataset: str | None, split: str | None, source: str) -> dict[str, Any]:
    if dataset is None:
        if current is None:
            raise ValueError(f"{source}: names no dataset to set the split {split!r} of; pass the dataset too.")
        current = {"id": current} if isinstance(current, str) else dict(current)
        return {**current, "split": split}
    keep_split = current.get("split") if isinstance(current, dict) else None
    return {"id": dataset, "split": split if split is not None else keep_split}


def validate_results(results: Any, source: str = "results") -> None:
    """Checks a results dict in the card's schema; raises `ValueError` naming `source` and the wrong entry."""
    if not isinstance(results, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, got {type(results).__name__}.")
    unknown = sorted(set(results) - set(RESULTS_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(RESULTS_KEYS)}.")
    metrics = results.get("results") or {}
    if not isinstance(metrics, dict):
        raise ValueError(f"{source}: `results` must be an object of {{metric: accuracy in percent}}.")
    for key, value in metrics.items():
        if key not in RESULT_METRICS and key not in SEGMENTATION_METRICS:
            known = sorted([*RESULT_METRICS, *SEGMENTATION_METRICS])
            raise ValueError(f"{source}: unknown metric `results.{key}`; known metrics: {known}.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"{source}: `results.{key}` must be a number (percent) or null, got {value!r}.")
    pretraining = results.get("pretraining") or {}
    if not isinstance(pretraining, dict):
        raise ValueError(f"{source}: `pretraining` must be an object of {{name: value}}.")
    dataset = results.get("dataset")
    if dataset is not None and not isinstance(dataset, (str, dict)):
        raise ValueError(f"{source}: `dataset` must be a Hub id string or an object with `id`.")
    if isinstance(dataset, dict) and not dataset.get("id"):
        raise ValueError(f"{source}: `dataset.id` is missing.")
    if metrics and any(value is not None for value in metrics.values()) and dataset is None:
        raise ValueError(f"{source}: `dataset` is required when `results` holds numbers (which data were they on?).")


def evaluation_dataset(results: dict[str, Any]) -> EvaluationDataset | None:
    dataset = results.get("dataset")
    if dataset is None:
        return None
    if isinstance(dataset, str):
        return EvaluationDataset(id=dataset, name=dataset)
    return EvaluationDataset(
        id=str(dataset["id"]),
        name=str(dataset.get("name") or dataset["id"]),
        split=dataset.get("split"),
        config=dataset.get("config"),
    )


def measured_metrics(results: dict[str, Any]) -> list[tuple[str, str, int, float]]:
    """`(key, protocol, k, value)` for each number present in `results["results"]`, in `RESULT_METRICS` order."""
    metrics = results.get("results") or {}
    return [
        (key, protocol, k, float(metrics[key]))
        for key, (protocol, k) in RESULT_METRICS.items()
        if metrics.get(key) is not None
    ]


def measured_segmentation_metrics(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """`(key, name, value)` for each segmentation number present in `results["results"]`."""
    metrics = results.get("results") or {}
    return [
        (key, name, float(metrics[key])) for key, name in SEGMENTATION_METRICS.items() if metrics.get(key) is not None
    ]


def format_accuracy(value: float) -> str:
    """How an accuracy (percent) is written in the card's table: two decimals."""
    return f"{value:.2f}"


# ------------------------------------------------------------------------------------------------------------------
# Model card


# the `model_type` of a stage-1 folder (`MimCoForContrastivePreTraining`, MoCo v3), whose ViT is its `backbone_config`
CONTRASTIVE_MODEL_TYPE = "mimco_contrastive"


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("model_type") in ("upernet", CONTRASTIVE_MODEL_TYPE) and isinstance(
        config.get("backbone_config"), dict
    ):
        config = config["backbone_config"]  # the MimCo backbone under the UperNet head, or stage 1's encoder
    return {
        "image_size": config.get("image_size"),
        "patch_size": config.get("patch_size"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": config.get("num_attention_heads"),
        "intermediate_size": config.get("intermediate_size"),
        "pooling": config.get("pooling", "cls"),
        "position_embedding_type": config.get("position_embedding_type", "learned"),
    }


def count_parameters(checkpoint_dir: str | Path, only_prefix: str | None = None) -> int | None:
    """Parameters of the backbone (and classifier) stored in the folder's safetensors files, read from their headers
    only; a pre-training checkpoint's teacher and heads are not counted, and with `only_prefix` only the weights
    under it are (`base_encoder.`: a stage-1 folder's trained ViT). `None` without safetensors files."""
    from safetensors import safe_open

    from modeling_mimco.modeling_mimco import PRETRAINING_ONLY_PREFIXES

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(PRETRAINING_ONLY_PREFIXES):
                    continue
                if only_prefix is not None and not name.startswith(only_prefix):
                    continue
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def _training_recipe(config: dict[str, Any], pretraining: dict[str, Any]) -> list[tuple[str, str]]:
    recipe = []
    teacher = config.get("teacher_config")
    if isinstance(teacher, dict):
        teacher_desc = (
            f"{teacher.get('model_type', '?')}, width {teacher.get('hidden_size')}, "
            f"{teacher.get('num_hidden_layers')} layers, patch {teacher.get('patch_size')}"
        )
        recipe.append(("Teacher (frozen)", teacher_desc))
    fields = [
        ("Masking", "mask_strategy"),
        ("Mask ratio", "mask_ratio"),
        ("Mask block size (px)", "mask_patch_size"),
        ("Patch loss", "patch_loss_type"),
        ("Patch loss negatives", "patch_negatives"),
        ("Patch loss temperature / weight", ("patch_temperature", "patch_loss_weight")),
        ("Image loss", "image_loss_type"),
        ("Image loss temperature / weight", ("image_temperature", "image_loss_weight")),
        ("Head hidden size", "head_hidden_size"),
        ("Stochastic depth", "drop_path_rate"),
        # stage 1 (MoCo v3), from a `mimco_contrastive` config
        ("Projector hidden / output size", ("projector_hidden_size", "projection_size")),
        ("InfoNCE temperature", "temperature"),
        ("Momentum (start / end, cosine)", ("momentum", "momentum_final")),
        ("Frozen patch projection", "freeze_patch_embeddings"),
    ]
    for label, names in fields:
        if isinstance(names, tuple):
            if all(name in config for name in names):
                recipe.append((label, " / ".join(str(config[name]) for name in names)))
        elif names in config:
            recipe.append((label, str(config[names])))
    for name, value in pretraining.items():
        recipe.append((str(name).replace("_", " ").capitalize(), str(value)))
    return recipe


def read_template(template_path: str | Path | None = None) -> str:
    """The text of a Jinja2 model-card template: `template_path`, or the one shipped in the package."""
    if template_path is None:
        try:
            return DEFAULT_TEMPLATE.read_text(encoding="utf-8")
        except OSError:
            raise OSError(
                f"{DEFAULT_TEMPLATE}: the model-card template shipped with modeling_mimco is missing; reinstall the "
                "package, or pass a template with `--template`."
            ) from None
    path = Path(template_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such model-card template; pass one with `--template`.")
    return path.read_text(encoding="utf-8")


def _read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The `config.json` of a checkpoint folder, as a dict."""
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{checkpoint_dir}: no config.json; a saved MimCo checkpoint folder was expected.")
    return json.loads(config_file.read_text(encoding="utf-8"))


def _card_datasets(pretraining: dict[str, Any], dataset: EvaluationDataset | None) -> list[str]:
    """The metadata's `datasets`: the pre-training dataset (when named by a Hub id), then the evaluation dataset."""
    datasets = []
    pretraining_dataset = pretraining.get("dataset")
    if isinstance(pretraining_dataset, str):
        datasets.append(pretraining_dataset)
    if dataset is not None and dataset.id not in datasets:
        datasets.append(dataset.id)
    return datasets


def _eval_results(dataset: EvaluationDataset | None, metrics: list[tuple[str, str, int, float]]) -> list[EvalResult]:
    """The `model-index` entries: one `accuracy` metric per measured number, on the evaluation dataset."""
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset.id,
            dataset_name=dataset.name,
            dataset_split=dataset.split,
            dataset_config=dataset.config,
            metric_type="accuracy",
            metric_name=f"{protocol} top-{k} accuracy",
            metric_value=value,
        )
        for _, protocol, k, value in metrics
    ]


def _segmentation_eval_results(
    dataset: EvaluationDataset | None, metrics: list[tuple[str, str, float]]
) -> list[EvalResult]:
    """The `model-index` entries of a segmentation checkpoint: mean IoU, mean and pixel accuracy."""
    return [
        EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset.id,
            dataset_name=dataset.name,
            dataset_split=dataset.split,
            dataset_config=dataset.config,
            metric_type="mean_iou" if key == "segmentation_mean_iou" else "accuracy",
            metric_name=name,
            metric_value=value,
        )
        for key, name, value in metrics
    ]


def _evaluation_rows(metrics: list[tuple[str, str, int, float]]) -> list[dict[str, str]]:
    """The rows of the card's evaluation table: one per protocol, with its top-1 and top-5 (`–` when absent)."""
    protocols: dict[str, dict[int, str]] = {}
    for _, protocol, k, value in metrics:
        protocols.setdefault(protocol, {})[k] = format_accuracy(value)
    return [
        {"protocol": protocol, "top1": values.get(1, "–"), "top5": values.get(5, "–")}
        for protocol, values in protocols.items()
    ]


def _auto_class(is_classifier: bool, is_contrastive: bool) -> str:
    """The Auto class the card's snippets load the folder with: the one its `auto_map` names for its class."""
    if is_classifier:
        return "AutoModelForImageClassification"
    if is_contrastive:
        # a stage-1 folder maps only `AutoModelForPreTraining` (`MimCoForContrastivePreTraining`): two image views in
        return "AutoModelForPreTraining"
    # a pre-training checkpoint is used for its student: `AutoModel` loads it as a `MimCoModel`, teacher skipped
    return "AutoModel"


def build_model_card(
    checkpoint_dir: str | Path,
    results: dict[str, Any] | None = None,
    repo_id: str | None = None,
    template_path: str | Path | None = None,
    card_license: str | None = None,
) -> ModelCard:
    """Fills the model-card template from a checkpoint folder's `config.json` and a results dict.

    The metadata gets `library_name: transformers`, the MimCo tags, the pipeline tag (`image-classification` for a
    `MimCoForImageClassification` checkpoint, `image-feature-extraction` otherwise), the datasets, and a
    `model-index` with one `accuracy` metric per measured number. The snippets load the folder with the Auto class
    of its `auto_map` (`_auto_class`); a stage-1 folder (`mimco_contrastive`) gets its encoder's shape, its MoCo v3
    settings in the recipe and a snippet that feeds two views. The card is parsed back with
    `huggingface_hub.ModelCard` before it is returned, so a card that the Hub would misread raises `ValueError`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = _read_config(checkpoint_dir)
    results = dict(results or {})
    validate_results(results)
    template = read_template(template_path)

    repo_id = repo_id or checkpoint_dir.resolve().name
    model_name = results.get("model_name") or repo_id.split("/")[-1]
    architectures = config.get("architectures") or ["MimCoModel"]
    is_classifier = "MimCoForImageClassification" in architectures
    is_segmenter = config.get("model_type") == "upernet"
    is_contrastive = config.get("model_type") == CONTRASTIVE_MODEL_TYPE
    pipeline_tag = "image-classification" if is_classifier else "image-feature-extraction"
    pipeline_tag = "image-segmentation" if is_segmenter else pipeline_tag
    dataset = evaluation_dataset(results)
    metrics = measured_metrics(results)
    segmentation = measured_segmentation_metrics(results)
    pretraining = results.get("pretraining") or {}
    eval_results = _eval_results(dataset, metrics) + _segmentation_eval_results(dataset, segmentation)
    card_data = ModelCardData(
        model_name=model_name,
        license=card_license or results.get("license") or "apache-2.0",
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=CARD_TAGS + [pipeline_tag],
        datasets=_card_datasets(pretraining, dataset) or None,
        metrics=(["mean_iou"] if segmentation else []) + (["accuracy"] if eval_results else []) or None,
        base_model=results.get("base_model"),
        eval_results=eval_results or None,
    )
    parameters = count_parameters(checkpoint_dir, only_prefix="base_encoder." if is_contrastive else None)
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        model_name=model_name,
        architecture=_architecture(config),
        architectures=architectures,
        auto_class=_auto_class(is_classifier, is_contrastive),
        is_classifier=is_classifier,
        is_contrastive=is_contrastive,
        is_segmenter=is_segmenter,
        segmentation_rows=[{"name": name, "value": format_accuracy(value)} for _, name, value in segmentation],
        num_labels=len(config.get("id2label") or {}),
        num_parameters=f"{parameters / 1e6:.1f}M" if parameters else None,
        recipe=_training_recipe(config, pretraining),
        evaluation_rows=_evaluation_rows(metrics),
        evaluation_dataset=dataset,
        citation=MIMCO_CITATION,
    )
    return validate_model_card(str(card), expect_eval_results=bool(eval_results))


def validate_model_card(content: str, expect_eval_results: bool = False) -> ModelCard:
    """Parses card text with `huggingface_hub.ModelCard`; raises `ValueError` if the metadata does not parse or the
    `model-index` gives no evaluation results when some were expected."""
    try:
        card = ModelCard(content, ignore_metadata_errors=False)
    except Exception as error:  # huggingface_hub raises ValueError or yaml errors
        raise ValueError(f"The model card's metadata does not parse: {error}") from None
    if card.data.library_name != "transformers":
        raise ValueError("The model card's metadata lacks `library_name: transformers`.")
    if expect_eval_results and not card.data.eval_results:
        raise ValueError("The model card's `model-index` does not parse into evaluation results.")
    return card


__all__ = [
    "DEFAULT_TEMPLATE",
    "LINEAR_PROBE_RESULTS_NAME",
    "RESULTS_KEYS",
    "RESULT_METRICS",
    "build_model_card",
    "format_accuracy",
    "load_results",
    "read_template",
    "validate_model_card",
    "validate_results",
]
