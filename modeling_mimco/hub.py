"""Model cards and Hub uploads for MimCo checkpoints; the logic behind `scripts/make_model_card.py` and
`scripts/push_to_hub.py`.

Results file
------------
A card is filled from a checkpoint folder's `config.json` and, optionally, a results JSON written by the evaluation
scripts. Its schema (every entry optional):

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
  is simply left out of the card; an unknown key is an error (a typo would otherwise vanish silently).
* `pretraining` is free-form `{name: value}`: it is listed, after the fields read from `config.json`, in the card's
  training recipe.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token


DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"

# results key -> (evaluation protocol, shown as, top-k)
RESULT_METRICS = {
    "linear_probe_top1": ("Linear probe", 1),
    "linear_probe_top5": ("Linear probe", 5),
    "knn_top1": ("k-NN", 1),
    "knn_top5": ("k-NN", 5),
    "finetune_top1": ("Fine-tuning", 1),
    "finetune_top5": ("Fine-tuning", 5),
}

MIMCO_CITATION = """@inproceedings{zhou2022mimco,
  title     = {MimCo: Masked Image Modeling Pre-training with Contrastive Teacher},
  author    = {Zhou, Qiang and Yu, Chaohui and Luo, Hao and Wang, Zhibin and Li, Hao},
  booktitle = {Proceedings of the 30th ACM International Conference on Multimedia (ACM MM)},
  year      = {2022},
  eprint    = {2209.03063},
  archivePrefix = {arXiv}
}"""

CARD_TAGS = ["mimco", "vision", "vit", "self-supervised-learning", "masked-image-modeling"]

# Files that are uploaded besides the weights and the code files that `auto_map` needs.
REQUIRED_FILES = {
    "config.json": "save the model with `save_pretrained` (after `import modeling_mimco`)",
    "preprocessor_config.json": "save a `ViTImageProcessor` next to the model",
    "README.md": "write the model card with scripts/make_model_card.py",
}
# A Hugging Face user access token, wherever it might have been pasted.
_HF_TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")


# ------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class EvaluationDataset:
    id: str
    name: str
    split: str | None = None
    config: str | None = None


def load_results(path: str | Path) -> dict[str, Any]:
    """Reads and validates a results JSON (schema in this module's docstring); raises `ValueError` naming the file
    and the entry that is wrong."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such results file.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    validate_results(results, str(path))
    return results


def validate_results(results: Any, source: str = "results") -> None:
    if not isinstance(results, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, got {type(results).__name__}.")
    metrics = results.get("results") or {}
    if not isinstance(metrics, dict):
        raise ValueError(f"{source}: `results` must be an object of {{metric: accuracy in percent}}.")
    for key, value in metrics.items():
        if key not in RESULT_METRICS:
            raise ValueError(f"{source}: unknown metric `results.{key}`; known metrics: {sorted(RESULT_METRICS)}.")
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


def format_accuracy(value: float) -> str:
    """How an accuracy (percent) is written in the card's table: two decimals."""
    return f"{value:.2f}"


# ------------------------------------------------------------------------------------------------------------------
# Model card


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
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


def count_parameters(checkpoint_dir: str | Path) -> int | None:
    """Parameters of the backbone (and classifier) stored in the folder's safetensors files, read from their headers
    only; a pre-training checkpoint's teacher and heads are not counted. `None` without safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(("teacher.", "patch_head.", "image_head.")):
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
    `model-index` with one `accuracy` metric per measured number. The card is parsed back with
    `huggingface_hub.ModelCard` before it is returned, so a card that the Hub would misread raises `ValueError`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{checkpoint_dir}: no config.json; a saved MimCo checkpoint folder was expected.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    results = dict(results or {})
    validate_results(results)
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template_path.is_file():
        raise ValueError(f"{template_path}: no such model-card template; pass one with `--template`.")

    repo_id = repo_id or checkpoint_dir.resolve().name
    model_name = results.get("model_name") or repo_id.split("/")[-1]
    architectures = config.get("architectures") or ["MimCoModel"]
    is_classifier = "MimCoForImageClassification" in architectures
    pipeline_tag = "image-classification" if is_classifier else "image-feature-extraction"
    # a pre-training checkpoint is used for its student: `AutoModel` loads it as a `MimCoModel`, teacher skipped
    auto_class = "AutoModelForImageClassification" if is_classifier else "AutoModel"

    dataset = evaluation_dataset(results)
    metrics = measured_metrics(results)
    pretraining = results.get("pretraining") or {}
    datasets = []
    pretraining_dataset = pretraining.get("dataset")
    if isinstance(pretraining_dataset, str):
        datasets.append(pretraining_dataset)
    if dataset is not None and dataset.id not in datasets:
        datasets.append(dataset.id)

    eval_results = [
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
    card_data = ModelCardData(
        model_name=model_name,
        license=card_license or results.get("license") or "apache-2.0",
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=CARD_TAGS + [pipeline_tag],
        datasets=datasets or None,
        metrics=["accuracy"] if eval_results else None,
        base_model=results.get("base_model"),
        eval_results=eval_results or None,
    )

    protocols = {}
    for _, protocol, k, value in metrics:
        protocols.setdefault(protocol, {})[k] = format_accuracy(value)
    evaluation_rows = [
        {"protocol": protocol, "top1": values.get(1, "–"), "top5": values.get(5, "–")}
        for protocol, values in protocols.items()
    ]
    parameters = count_parameters(checkpoint_dir)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=model_name,
        architecture=_architecture(config),
        architectures=architectures,
        auto_class=auto_class,
        is_classifier=is_classifier,
        num_labels=len(config.get("id2label") or {}),
        num_parameters=f"{parameters / 1e6:.1f}M" if parameters else None,
        recipe=_training_recipe(config, pretraining),
        evaluation_rows=evaluation_rows,
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


# ------------------------------------------------------------------------------------------------------------------
# Upload


def _auto_map_modules(auto_map: dict[str, Any]) -> list[str]:
    """Module names (`modeling_mimco`...) that an `auto_map` points to inside the repository itself."""
    modules = []
    for reference in auto_map.values():
        references = reference if isinstance(reference, (list, tuple)) else [reference]
        for item in references:
            if not item or "--" in item:  # `None`, or code that lives in another repository
                continue
            module = item.rsplit(".", 1)[0]
            if module not in modules:
                modules.append(module)
    return modules


def _relative_imports(module_file: Path) -> list[str]:
    from transformers.dynamic_module_utils import get_relative_imports

    return sorted(get_relative_imports(str(module_file)))


def collect_upload_files(checkpoint_dir: str | Path) -> tuple[list[str], list[str]]:
    """The files of `checkpoint_dir` to upload, and those left out.

    Uploaded: `config.json` (which must hold an `auto_map`), the safetensors weights (and their shard index), the
    code files that `auto_map` names together with the modules they import relatively, `preprocessor_config.json`
    and `README.md`. Anything else in the folder (optimizer states, pickles, logs...) stays local. Raises
    `ValueError` listing everything that is missing.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such checkpoint folder.")
    missing = [f"{name} ({hint})" for name, hint in REQUIRED_FILES.items() if not (folder / name).is_file()]
    files = [name for name in REQUIRED_FILES if (folder / name).is_file()]

    weights = sorted(path.name for path in folder.glob("*.safetensors"))
    if not weights:
        missing.append("*.safetensors (the model weights; save with `save_pretrained`)")
    files += weights
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files.append(index.name)
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += [f"{shard} (listed in {index.name})" for shard in sorted(shards) if shard not in weights]

    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / 'config.json'}: not valid JSON ({error}).") from None
        auto_map = config.get("auto_map")
        if not auto_map:
            missing.append(
                "`auto_map` in config.json (save the model after `import modeling_mimco`, which registers it for "
                "remote code)"
            )
        else:
            pending = [module.replace(".", "/") + ".py" for module in _auto_map_modules(auto_map)]
            code_files = []
            while pending:
                name = pending.pop(0)
                if name in code_files:
                    continue
                code_files.append(name)
                if not (folder / name).is_file():
                    missing.append(f"{name} (code named by auto_map or imported by it)")
                    continue
                pending += [module.replace(".", "/") + ".py" for module in _relative_imports(folder / name)]
            files += [name for name in code_files if (folder / name).is_file()]

    if missing:
        raise ValueError(f"{folder} is not ready to upload; missing: " + "; ".join(missing) + ".")
    files = sorted(dict.fromkeys(files))
    left_out = sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and str(path.relative_to(folder)) not in files
    )
    return files, left_out


def check_no_secrets(checkpoint_dir: str | Path, files: list[str], token: str | None = None) -> None:
    """Refuses an upload whose files contain a Hugging Face access token (`token` itself, or anything shaped like
    one). The error names the file, never the token."""
    folder = Path(checkpoint_dir)
    needle = token.encode() if token else None
    for name in files:
        content = (folder / name).read_bytes()
        if (needle and needle in content) or _HF_TOKEN_PATTERN.search(content):
            raise ValueError(f"{folder / name} contains a Hugging Face access token; remove it before uploading.")


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload MimCo model",
    revision: str | None = None,
    api: Any = None,
) -> Any:
    """Creates `repo_id` if needed and uploads the files of `collect_upload_files` in one commit.

    The token comes from `HF_TOKEN` or the cached login (`hf auth login`), through huggingface_hub; it is never
    printed or written. Returns the `CommitInfo`.
    """
    files, _ = collect_upload_files(checkpoint_dir)
    token = get_token()
    if token is None:
        raise ValueError("No Hugging Face token: set HF_TOKEN or log in with `hf auth login`.")
    check_no_secrets(checkpoint_dir, files, token)
    api = api if api is not None else HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    folder = Path(checkpoint_dir)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    return api.create_commit(
        repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message, revision=revision
    )


__all__ = [
    "DEFAULT_TEMPLATE_PATH",
    "MIMCO_CITATION",
    "RESULT_METRICS",
    "build_model_card",
    "check_no_secrets",
    "collect_upload_files",
    "count_parameters",
    "evaluation_dataset",
    "format_accuracy",
    "load_results",
    "measured_metrics",
    "push_checkpoint",
    "validate_model_card",
    "validate_results",
]
