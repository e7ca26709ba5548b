"""Model cards: rendering from the template, the results JSON and config.json, and parsing with huggingface_hub."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.scripts import load_script
from huggingface_hub import ModelCard
from transformers import ViTImageProcessor

from modeling_mimco import (
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.hub import model_card


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("make_model_card")


def tiny_config(**overrides) -> MimCoConfig:
    values = dict(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        head_hidden_size=16,
        mask_ratio=0.45,
    )
    return MimCoConfig(**{**values, **overrides})


def save_checkpoint(folder: Path, model_class=MimCoModel, **overrides) -> Path:
    config = tiny_config(num_labels=3, **overrides) if model_class is MimCoForImageClassification else tiny_config()
    if model_class is MimCoForContrastivePreTraining:
        config = MimCoContrastiveConfig(backbone_config=config, projector_hidden_size=16, projection_size=8)
    model_class(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


RESULTS = {
    "model_name": "mimco-vit-tiny-test",
    "dataset": {"id": "uoft-cs/cifar10", "name": "CIFAR-10", "split": "test"},
    "results": {"linear_probe_top1": 71.236, "linear_probe_top5": 97.5, "knn_top1": 64.125, "finetune_top1": None},
    "pretraining": {"teacher": "tiny MoCo v3 ViT", "dataset": "uoft-cs/cifar10", "epochs": 3, "batch_size": 64},
}


def test_card_from_results_parses_and_holds_the_numbers(script, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt")
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(RESULTS))
    path = script.main(
        ["--checkpoint_dir", str(folder), "--results_file", str(results_file), "--hub_model_id", "me/mimco-tiny"]
    )
    assert path == folder / "README.md"

    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert {"mimco", "vision", "image-feature-extraction"} <= set(data.tags)
    assert "uoft-cs/cifar10" in data.datasets
    assert data.license

    measured = {key: value for key, value in RESULTS["results"].items() if value is not None}
    assert len(data.eval_results) == len(measured)
    for result in data.eval_results:
        assert result.task_type == "image-classification"
        assert result.dataset_type == RESULTS["dataset"]["id"]
        assert result.dataset_name == RESULTS["dataset"]["name"]
        assert result.dataset_split == RESULTS["dataset"]["split"]
        assert result.metric_type == "accuracy"
    assert sorted(result.metric_value for result in data.eval_results) == sorted(measured.values())
    for value in measured.values():
        assert model_card.format_accuracy(value) in card.text
    # The missing fine-tuning number is left out, not written as an empty or zero entry.
    assert "Fine-tuning top-1" not in str(card)
    assert "| Fine-tuning |" not in card.text

    text = card.text
    assert 'repo_id = "me/mimco-tiny"' in text
    assert "AutoModel.from_pretrained(repo_id, trust_remote_code=True)" in text
    assert "import modeling_mimco" in text
    assert "2209.03063" in text and "Contrastive Teacher" in text
    assert "## Limitations" in text
    assert f"| Mask ratio | {tiny_config().mask_ratio} |" in text
    assert "| Epochs | 3 |" in text
    assert f"# {RESULTS['model_name']}" in text
    # The parsed card round-trips through huggingface_hub's own reader.
    assert ModelCard(str(card)).data.eval_results == data.eval_results


def test_classifier_card_uses_image_classification(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", MimCoForImageClassification)
    card = model_card.build_model_card(folder, {"dataset": "uoft-cs/cifar10", "results": {"finetune_top1": 90.0}})
    assert card.data.pipeline_tag == "image-classification"
    assert "AutoModelForImageClassification.from_pretrained" in card.text
    assert [result.metric_value for result in card.data.eval_results] == [90.0]
    assert card.data.eval_results[0].dataset_name == "uoft-cs/cifar10"


def test_card_without_results(script, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt")
    card = ModelCard.load(script.main(["--checkpoint_dir", str(folder)]))
    assert card.data.eval_results is None
    assert card.data.library_name == "transformers"
    assert "No evaluation results" in card.text


@pytest.mark.parametrize(
    "results, message",
    [
        ({"dataset": "x", "results": {"linear_top1": 50.0}}, "linear_top1"),
        ({"dataset": "x", "results": {"knn_top1": "high"}}, "knn_top1"),
        ({"results": {"knn_top1": 50.0}}, "dataset"),
        ({"dataset": "x", "pretraining": [1, 2]}, "pretraining"),
    ],
)
def test_bad_results_are_refused(script, tmp_path, results, message):
    folder = save_checkpoint(tmp_path / "ckpt")
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=message):
        script.main(["--checkpoint_dir", str(folder), "--results_file", str(results_file)])
    assert not (folder / "README.md").exists()


def test_existing_card_is_kept_without_overwrite(script, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt")
    (folder / "README.md").write_text("hand-written")
    with pytest.raises(SystemExit, match="overwrite_output"):
        script.main(["--checkpoint_dir", str(folder)])
    assert (folder / "README.md").read_text() == "hand-written"
    script.main(["--checkpoint_dir", str(folder), "--overwrite_output"])
    assert ModelCard.load(folder / "README.md").data.library_name == "transformers"


def test_validate_model_card_rejects_broken_metadata():
    with pytest.raises(ValueError, match="library_name"):
        model_card.validate_model_card("---\nlicense: mit\n---\n# card\n")
    broken_index = "---\nlibrary_name: transformers\nmodel-index:\n- name: x\n  results: 3\n---\n# card\n"
    with pytest.raises(ValueError, match="model.index"):
        model_card.validate_model_card(broken_index, expect_eval_results=True)
    with pytest.raises(ValueError, match="model-index"):
        model_card.validate_model_card("---\nlibrary_name: transformers\n---\n# card\n", expect_eval_results=True)


@pytest.mark.parametrize(
    "model_class", [MimCoForPreTraining, MimCoForImageClassification, MimCoForContrastivePreTraining]
)
def test_the_cards_remote_code_example_runs(tmp_path, monkeypatch, model_class):
    """The "transformers only" snippet of a generated card works on the checkpoint it describes."""
    import re

    folder = save_checkpoint(tmp_path / "checkpoint", model_class=model_class)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    content = str(model_card.build_model_card(folder, model_card.load_results(results), repo_id="me/mimco-tiny"))
    snippet = re.findall(r"```python\n(.*?)```", content, re.DOTALL)[1]
    snippet = snippet.replace('"me/mimco-tiny"', repr(str(folder))).replace(
        'Image.open("image.jpg")', "Image.new('RGB', (40, 30))"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {}
    exec(compile(snippet, "card-example", "exec"), namespace)
    if model_class is MimCoForImageClassification:
        assert namespace["predicted_class"] in namespace["model"].config.id2label.values()
    elif model_class is MimCoForContrastivePreTraining:
        # a stage-1 folder maps only AutoModelForPreTraining: the card loads it so, and feeds it two views
        assert "AutoModelForPreTraining.from_pretrained(repo_id, trust_remote_code=True)" in content
        assert "model_type: mimco_contrastive" in content and "| Architecture | ViT, 2 blocks, width 32" in content
        assert type(namespace["model"]).__name__ == "MimCoForContrastivePreTraining"
        assert namespace["loss"].ndim == 0 and tuple(namespace["features"].shape) == (1, 32)
        assert "| InfoNCE temperature |" in content
    else:
        assert type(namespace["model"]).__name__ == "MimCoModel"
        assert tuple(namespace["features"].shape) == (1, 32)


# ------------------------------------------------------------------------------------------------------------------
# The evaluation programs' own files as --results_file


def probe_entry(name: str, path: str, linear: float | None, knn: float | None) -> dict:
    """A `models` entry shaped as `FrozenFeatureResult.to_json()` writes it (accuracies as fractions)."""
    return {
        "name": name,
        "model_name_or_path": path,
        "source": "mimco",
        "feature_dim": 32,
        "pooling": "cls",
        "num_train_images": 100,
        "num_test_images": 40,
        "linear_probe_top1": linear,
        "knn_top1": knn,
    }


def probe_report(*entries: dict, dataset: str = "uoft-cs/cifar10") -> dict:
    return {
        "dataset": dataset,
        "train_split": "train",
        "eval_split": "test",
        "num_classes": 10,
        "linear_probe": {"epochs": 5},
        "knn": {"k": 20, "temperature": 0.07},
        "models": list(entries),
    }


@pytest.mark.slow
def test_card_from_the_linear_probe_results_of_run_linear_probe(script, tmp_path, capsys, one_thread):
    """The file that `mimco-probe` writes, for two models: the card takes the checkpoint's entry, in percent."""
    folder = save_checkpoint(tmp_path / "ckpt")
    probe = load_script("run_linear_probe")
    report = probe.main(
        ["--model_name_or_path", str(folder), "random-init", "--random_init_config", str(folder)]
        + ["--output_dir", str(tmp_path / "probe"), "--max_train_samples", "100", "--max_eval_samples", "40"]
        + ["--probe_epochs", "3", "--batch_size", "50"]
    )
    results_file = Path(report["results_file"])
    assert results_file.name == model_card.LINEAR_PROBE_RESULTS_NAME
    entry = next(model for model in json.loads(results_file.read_text())["models"] if model["name"] == "ckpt")

    path = script.main(["--checkpoint_dir", str(folder), "--results_file", str(results_file)])
    assert f"2 evaluation metrics from {results_file}" in capsys.readouterr().out
    card = ModelCard.load(path)
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {
        "Linear probe top-1 accuracy": pytest.approx(100 * entry["linear_probe_top1"]),
        "k-NN top-1 accuracy": pytest.approx(100 * entry["knn_top1"]),
    }
    assert {result.dataset_type for result in card.data.eval_results} == {report["dataset"]}
    assert {result.dataset_split for result in card.data.eval_results} == {report["eval_split"]}
    assert model_card.format_accuracy(100 * entry["knn_top1"]) in card.text

    # --results_model picks another entry of the same file
    other = model_card.load_results(results_file, checkpoint_dir=folder, model="random-init")
    random_entry = next(model for model in report["models"] if model["name"] == "random-init")
    assert other["results"]["knn_top1"] == pytest.approx(100 * random_entry["knn_top1"])


def test_linear_probe_entry_is_matched_by_path_then_by_folder_name(tmp_path):
    folder = save_checkpoint(tmp_path / "student")
    results_file = tmp_path / "linear_probe_results.json"
    other = tmp_path / "teacher"
    other.mkdir()
    # the same folder under another spelling of its path
    results_file.write_text(
        json.dumps(
            probe_report(
                probe_entry("teacher", str(other), 0.4, 0.3),
                probe_entry("my student", str(tmp_path / "." / "student"), 0.61, 0.52),
            )
        )
    )
    assert model_card.load_results(results_file, checkpoint_dir=folder)["results"] == {
        "linear_probe_top1": 61.0,
        "knn_top1": 52.0,
    }
    # the probe ran elsewhere: its relative paths do not exist from here, the folder name decides
    results_file.write_text(
        json.dumps(
            probe_report(
                probe_entry("teacher", "out/teacher", 0.4, 0.3), probe_entry("student", "out/student", 0.7, None)
            )
        )
    )
    results = model_card.load_results(results_file, checkpoint_dir=folder, dataset_split="validation")
    assert results["results"] == {"linear_probe_top1": 70.0, "knn_top1": None}
    assert results["dataset"] == {"id": "uoft-cs/cifar10", "split": "validation"}


@pytest.mark.parametrize(
    "entries, model, message",
    [
        # none of the entries is the checkpoint
        ((("teacher", "out/teacher"), ("random-init", "random-init")), None, "none of which is the checkpoint"),
        # two entries claim the checkpoint's folder name
        ((("ckpt", "a/ckpt"), ("b", "b/ckpt")), None, "several of which"),
        # a --results_model that the file does not hold
        ((("teacher", "out/teacher"), ("random-init", "random-init")), "student", "no model named 'student'"),
    ],
)
def test_linear_probe_entry_errors_list_the_names(script, tmp_path, entries, model, message):
    folder = save_checkpoint(tmp_path / "ckpt")
    results_file = tmp_path / "linear_probe_results.json"
    results_file.write_text(json.dumps(probe_report(*(probe_entry(n, p, 0.5, 0.5) for n, p in entries))))
    argv = ["--checkpoint_dir", str(folder), "--results_file", str(results_file)]
    with pytest.raises(SystemExit, match=message) as error:
        script.main(argv + (["--results_model", model] if model else []))
    text = str(error.value)
    assert text.split(": error: ", 1)[1].startswith(f"{results_file}") and "\n" not in text
    for name, _ in entries:
        assert repr(name) in text
    assert not (folder / "README.md").exists()


# What `Trainer.save_metrics("eval", ...)` writes in mimco-finetune (ClassificationMetrics: accuracy, top5_accuracy).
FINETUNE_EVAL_RESULTS = {
    "epoch": 2.0,
    "eval_accuracy": 0.8125,
    "eval_loss": 0.61,
    "eval_runtime": 0.5,
    "eval_samples_per_second": 30.0,
    "eval_steps_per_second": 4.0,
    "eval_top5_accuracy": 0.96875,
}


@pytest.mark.parametrize("name", ["eval_results.json", "all_results.json"])
def test_card_from_the_trainers_eval_results(script, tmp_path, name):
    folder = save_checkpoint(tmp_path / "finetuned", MimCoForImageClassification)
    results = dict(FINETUNE_EVAL_RESULTS)
    if name == "all_results.json":  # train and eval metrics together
        results.update(train_loss=1.2, train_runtime=3.0, train_samples_per_second=10.0)
    results_file = tmp_path / name
    results_file.write_text(json.dumps(results))
    argv = ["--checkpoint_dir", str(folder), "--results_file", str(results_file)]
    with pytest.raises(SystemExit, match="--dataset"):
        script.main(argv)

    card = ModelCard.load(script.main(argv + ["--dataset", "uoft-cs/cifar10", "--dataset_split", "test"]))
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {"Fine-tuning top-1 accuracy": 81.25, "Fine-tuning top-5 accuracy": 96.875}
    assert {(result.dataset_type, result.dataset_split) for result in card.data.eval_results} == {
        ("uoft-cs/cifar10", "test")
    }
    assert card.data.pipeline_tag == "image-classification"
    assert "| Fine-tuning | 81.25 | 96.88 |" in card.text


@pytest.mark.parametrize(
    "content, message",
    [
        # the pre-training loop's train_results.json
        ({"global_step": 2, "bad_steps": 0, "skipped_images": 0, "log_history": []}, "unknown results schema"),
        # the Trainer's train_results.json
        ({"epoch": 2.0, "train_loss": 1.2, "train_runtime": 3.0}, "unknown results schema"),
        # a typo in the card's own schema, which once gave a card with no numbers and no warning
        ({"dataset": "x", "result": {"knn_top1": 50.0}}, "unexpected keys: result"),
        ([1, 2], "must be a JSON object"),
        # percent where the Trainer writes fractions
        ({**FINETUNE_EVAL_RESULTS, "eval_accuracy": 81.25}, "eval_accuracy must be an accuracy between 0 and 1"),
    ],
)
def test_unknown_results_files_are_refused_in_one_line(script, tmp_path, content, message):
    folder = save_checkpoint(tmp_path / "ckpt")
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(content))
    argv = ["--checkpoint_dir", str(folder), "--results_file", str(results_file), "--dataset", "x"]
    with pytest.raises(SystemExit, match=message) as error:
        script.main(argv)
    text = str(error.value)
    assert text.split(": error: ", 1)[1].startswith(f"{results_file}") and "\n" not in text
    if "schema" in message:
        assert "linear_probe_results.json" in text and "eval_accuracy" in text  # says what was expected
    assert not (folder / "README.md").exists()


def test_a_results_file_without_numbers_warns(script, tmp_path, capsys):
    folder = save_checkpoint(tmp_path / "ckpt")
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps({"dataset": "x", "results": {"knn_top1": None}}))
    script.main(["--checkpoint_dir", str(folder), "--results_file", str(results_file)])
    captured = capsys.readouterr()
    assert "0 evaluation metrics" in captured.out
    assert f"warning: {results_file} holds no evaluation numbers" in captured.err


# ------------------------------------------------------------------------------------------------------------------
# The template in an installed wheel


@pytest.mark.slow
def test_the_template_is_read_from_the_built_wheel(tmp_path):
    """Build the wheel from a copy of the sources and render a card with the package imported straight from that
    wheel (a zip on PYTHONPATH): the template must be package data, read through importlib.resources; a
    `Path(__file__)` sibling does not exist inside a zip, and the clone is not on the path."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "modeling_mimco", source / "modeling_mimco", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "modeling_mimco/hub/templates/model_card.md" in archive.namelist()

    folder = save_checkpoint(tmp_path / "ckpt")
    program = (
        "import sys; import modeling_mimco.hub.model_card as model_card; print(model_card.__file__); "
        "print(model_card.DEFAULT_TEMPLATE.name); "
        "model_card.build_model_card(sys.argv[1], repo_id='me/mimco-wheel').save(sys.argv[2])"
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", program, str(folder), str(tmp_path / "card.md")],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(wheel), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    module_file, template_name = run.stdout.splitlines()[-2:]
    assert module_file == str(wheel / "modeling_mimco" / "hub" / "model_card.py")  # imported from inside the wheel
    assert template_name == "model_card.md"
    card = ModelCard.load(tmp_path / "card.md")
    assert card.data.library_name == "transformers"
    assert 'repo_id = "me/mimco-wheel"' in card.text and "2209.03063" in card.text
