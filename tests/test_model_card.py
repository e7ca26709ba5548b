"""Model cards: rendering from the template, the results JSON and config.json, and parsing with huggingface_hub."""

import json
from pathlib import Path

import pytest
from helpers.scripts import load_script
from huggingface_hub import ModelCard
from transformers import ViTImageProcessor

from modeling_mimco import MimCoConfig, MimCoForImageClassification, MimCoForPreTraining, MimCoModel, hub


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
        assert hub.format_accuracy(value) in card.text
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
    card = hub.build_model_card(folder, {"dataset": "uoft-cs/cifar10", "results": {"finetune_top1": 90.0}})
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
        hub.validate_model_card("---\nlicense: mit\n---\n# card\n")
    broken_index = "---\nlibrary_name: transformers\nmodel-index:\n- name: x\n  results: 3\n---\n# card\n"
    with pytest.raises(ValueError, match="model.index"):
        hub.validate_model_card(broken_index, expect_eval_results=True)
    with pytest.raises(ValueError, match="model-index"):
        hub.validate_model_card("---\nlibrary_name: transformers\n---\n# card\n", expect_eval_results=True)


@pytest.mark.parametrize("model_class", [MimCoForPreTraining, MimCoForImageClassification])
def test_the_cards_remote_code_example_runs(tmp_path, monkeypatch, model_class):
    """The "transformers only" snippet of a generated card works on the checkpoint it describes."""
    import re

    folder = save_checkpoint(tmp_path / "checkpoint", model_class=model_class)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    content = str(hub.build_model_card(folder, hub.load_results(results), repo_id="me/mimco-tiny"))
    snippet = re.findall(r"```python\n(.*?)```", content, re.DOTALL)[1]
    snippet = snippet.replace('"me/mimco-tiny"', repr(str(folder))).replace(
        'Image.open("image.jpg")', "Image.new('RGB', (40, 30))"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {}
    exec(compile(snippet, "card-example", "exec"), namespace)
    if model_class is MimCoForImageClassification:
        assert namespace["predicted_class"] in namespace["model"].config.id2label.values()
    else:
        assert type(namespace["model"]).__name__ == "MimCoModel"
        assert tuple(namespace["features"].shape) == (1, 32)
