"""Frozen-feature evaluation (`modeling_mimco.evaluation.frozen_features`, `scripts/run_linear_probe.py`): the offline top-k metric,
the linear probe and the weighted k-NN on synthetic features, backbone loading for every kind of checkpoint, feature
pooling, and the script's JSON and t-SNE outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers.scripts import load_script
from transformers import HfArgumentParser, ViTForMaskedImageModeling, ViTModel

from modeling_mimco import (
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.data.decoding import decode_image
from modeling_mimco.data.sources import load_classification_splits, load_labelled_splits
from modeling_mimco.data.transforms import build_eval_transform
from modeling_mimco.evaluation.frozen_features import (
    LinearProbeConfig,
    build_linear_probe,
    classifier_accuracy,
    extract_features,
    knn_accuracy,
    knn_classify,
    pool_features,
    results_table,
    train_linear_probe,
)
from modeling_mimco.evaluation.metrics import ClassificationMetrics, TopKAccuracy, load_accuracy_metric
from modeling_mimco.interop.model_folders import PIXELS, RANDOM_INIT, load_backbone


REPO = Path(__file__).resolve().parents[1]
CIFAR10_DIR = REPO.parent / "shared" / "datasets" / "cifar10"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# metric


def test_top_k_accuracy_counts_hits_among_the_k_best(no_network):
    ranked = [[3, 1, 0, 2, 4], [0, 2, 1, 3, 4], [4, 3, 2, 1, 0], [1, 0, 2, 3, 4]]
    references = [3, 2, 1, 4]
    # top-1: only example 0; top-2: examples 0 and 1; top-5: all
    metric = TopKAccuracy(keep_in_memory=True)
    assert metric.compute(predictions=ranked, references=references, top_k=(1, 2, 5)) == {
        "accuracy": 0.25,
        "top2_accuracy": 0.5,
        "top5_accuracy": 1.0,
    }
    # one predicted class per example, added in batches
    metric = load_accuracy_metric()
    metric.add_batch(predictions=[1, 2], references=[1, 0])
    metric.add_batch(predictions=[0], references=[0])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="top_k=3"):
        load_accuracy_metric().compute(predictions=[[0, 1]], references=[0], top_k=(3,))


def test_classification_metrics_ranks_logits_and_reports_top5_only_with_5_classes(no_network):
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4], [0.8, 0.1, 0.0, 0.2, 0.3, 0.4], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = np.array([1, 5, 0])  # first right; second's class ranks 2nd; third's class ranks last
    metrics = ClassificationMetrics(num_labels=6)(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics == {"accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}
    three = ClassificationMetrics(num_labels=3)(
        EvalPrediction(predictions=logits[:, :3], label_ids=np.array([1, 0, 2]))
    )
    assert set(three) == {"accuracy"} and three["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# linear probe and k-NN on synthetic features


def _clusters(num_classes=4, dim=16, num_train=400, num_test=200, spread=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * spread
    offset = torch.randn(dim, generator=generator) * 10  # a large common component, as untrained ViT features have

    def draw(n):
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        return centres[labels] + offset + torch.randn(n, dim, generator=generator), labels

    return (*draw(num_train), *draw(num_test))


def test_linear_probe_and_knn_separate_gaussian_clusters():
    train_x, train_y, test_x, test_y = _clusters()
    probe = train_linear_probe(train_x, train_y, 4, LinearProbeConfig(epochs=30))
    assert classifier_accuracy(probe, test_x, test_y) > 0.9
    assert knn_accuracy(train_x, train_y, test_x, test_y, 4) > 0.9


@pytest.mark.parametrize("optimizer, learning_rate", [("sgd", 0.5), ("adamw", 1e-2)])
def test_linear_probe_and_knn_are_at_chance_on_random_labels(optimizer, learning_rate):
    train_x, _, test_x, _ = _clusters(num_train=600, num_test=400)
    generator = torch.Generator().manual_seed(1)
    train_y = torch.randint(0, 4, (600,), generator=generator)
    test_y = torch.randint(0, 4, (400,), generator=generator)
    probe = train_linear_probe(
        train_x, train_y, 4, LinearProbeConfig(epochs=30, optimizer=optimizer, learning_rate=learning_rate)
    )
    # chance is 25 %; 400 test labels put 40 % about 7 standard deviations above it
    assert classifier_accuracy(probe, test_x, test_y) < 0.4
    assert knn_accuracy(train_x, train_y, test_x, test_y, 4) < 0.4


def test_linear_probe_is_batchnorm_without_affine_then_linear():
    probe = build_linear_probe(8, 3)
    norm, linear = probe
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and norm.weight is None
    assert isinstance(linear, torch.nn.Linear) and linear.in_features == 8 and linear.out_features == 3
    # the probe is invariant to a per-dimension affine change of the features (the BatchNorm standardises them)
    train_x, train_y, test_x, test_y = _clusters(dim=8, num_classes=3)
    scale, shift = torch.linspace(0.1, 50, 8), torch.linspace(-100, 100, 8)
    config = LinearProbeConfig(epochs=5, seed=3)
    plain = train_linear_probe(train_x, train_y, 3, config)
    scaled = train_linear_probe(train_x * scale + shift, train_y, 3, config)
    assert torch.equal(plain(test_x).argmax(1), scaled(test_x * scale + shift).argmax(1))


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # Query along x. Two training points of class 0 at 60 degrees, one of class 1 at 10 degrees: a plain majority of
    # the 3 neighbours says 0, DINO's weights exp(cos/T) at T=0.07 say 1 (exp(0.985/.07) >> 2 exp(0.5/.07)).
    def unit(degrees):
        radians = torch.tensor(degrees) * torch.pi / 180
        return torch.stack([radians.cos(), radians.sin()])

    train = torch.stack([unit(60.0), unit(-60.0), unit(10.0), unit(180.0)])
    labels = torch.tensor([0, 0, 1, 2])
    query = unit(0.0)[None] * 5.0  # the length does not matter: cosine similarity
    assert knn_classify(train, labels, query, num_classes=3, k=3, temperature=0.07).tolist() == [1]
    # at a high temperature the weights are almost equal and the majority wins
    assert knn_classify(train, labels, query, num_classes=3, k=3, temperature=100.0).tolist() == [0]
    # k counts neighbours: with k=1 only the nearest votes, whatever the temperature
    assert knn_classify(train, labels, query, num_classes=3, k=1, temperature=100.0).tolist() == [1]


# ---------------------------------------------------------------------------------------------------------------------
# backbones and features


def _image_dataset(num_images=12, num_classes=3, size=32, seed=0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(num_images):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(index % num_classes)
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(num_classes=num_classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_pooling_takes_cls_patch_mean_or_pooler(tiny_mimco_config):
    model = MimCoModel(tiny_mimco_config(pooling="mean")).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32))
    tokens = outputs.last_hidden_state
    assert torch.equal(pool_features(outputs, "cls"), tokens[:, 0])
    assert torch.allclose(pool_features(outputs, "mean"), tokens[:, 1:].mean(1))
    assert torch.equal(pool_features(outputs, "pooler"), outputs.pooler_output)
    assert not torch.allclose(pool_features(outputs, "mean", num_prefix_tokens=3), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pooling"):
        pool_features(outputs, "max")


def test_extract_features_matches_a_direct_forward_in_order(tiny_mimco_config):
    torch.manual_seed(0)
    backbone = load_backbone(RANDOM_INIT, model_preset="tiny")
    dataset = _image_dataset(num_images=7)
    features, labels = extract_features(backbone, dataset, "image", "label", batch_size=3, crop_pct=1.0)
    assert features.shape == (7, backbone.feature_dim) and labels.tolist() == [i % 3 for i in range(7)]
    image = PIL.Image.open(io.BytesIO(dataset[5]["image"]["bytes"])).convert("RGB")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(backbone.image_mean)[:, None, None], torch.tensor(backbone.image_std)[:, None, None]
    with torch.no_grad():
        expected = backbone.model(((pixels - mean) / std)[None]).last_hidden_state[0, 0]
    assert torch.allclose(features[5], expected, atol=1e-4)


def test_backbones_load_from_every_kind_of_checkpoint(tmp_path, tiny_mimco_config, tiny_vit_teacher_config):
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32)

    pretraining = MimCoForPreTraining(tiny_mimco_config()).eval()
    pretraining.save_pretrained(tmp_path / "pretraining")
    classifier = MimCoForImageClassification(tiny_mimco_config(num_labels=3, pooling="mean")).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    teacher = MimCoModel(tiny_mimco_config(position_embedding_type="sincos")).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    contrastive = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(
            backbone_config=tiny_mimco_config(position_embedding_type="sincos"),
            projector_hidden_size=16,
            projection_size=8,
        )
    ).eval()
    with torch.no_grad():  # make the momentum encoder differ from the base encoder
        for parameter in contrastive.momentum_encoder.parameters():
            parameter.add_(0.01)
    contrastive.save_pretrained(tmp_path / "contrastive")
    vit = ViTModel(tiny_vit_teacher_config()).eval()
    vit.save_pretrained(tmp_path / "vit")

    cases = {
        "pretraining": (pretraining.mimco, "MimCoForPreTraining checkpoint (student)"),
        "classifier": (classifier.mimco, "MimCoForImageClassification checkpoint (backbone)"),
        "teacher": (teacher, "MimCoModel checkpoint"),
        "contrastive": (contrastive.momentum_encoder, "momentum encoder"),
        "vit": (vit, "ViTModel"),
    }
    for name, (reference, source) in cases.items():
        backbone = load_backbone(str(tmp_path / name))
        assert source in backbone.source, (name, backbone.source)
        assert backbone.image_size == 32 and not backbone.model.training
        assert not any(parameter.requires_grad for parameter in backbone.model.parameters())
        with torch.no_grad():
            got = backbone.model(pixel_values).last_hidden_state
            expected = reference(pixel_values).last_hidden_state
        assert torch.allclose(got, expected, atol=1e-5), name


def test_pooler_pooling_is_refused_when_the_checkpoint_has_no_trained_pooler(tmp_path, tiny_vit_teacher_config):
    # a SimMIM checkpoint has no pooler: AutoModel builds ViTModel's pooler from random weights
    torch.manual_seed(0)
    ViTForMaskedImageModeling(tiny_vit_teacher_config()).save_pretrained(tmp_path / "simmim")
    ViTModel(tiny_vit_teacher_config()).save_pretrained(tmp_path / "vit_with_pooler")
    dataset = _image_dataset(num_images=4)

    simmim = load_backbone(str(tmp_path / "simmim"))
    assert "pooler.dense.weight" in simmim.untrained_weights
    with pytest.raises(ValueError, match=r"no trained pooler \(pooler\.dense\.bias, pooler\.dense\.weight"):
        extract_features(simmim, dataset, "image", "label", pooling="pooler")
    cls_features, _ = extract_features(simmim, dataset, "image", "label", pooling="cls")
    assert cls_features.shape == (4, 24)

    with_pooler = load_backbone(str(tmp_path / "vit_with_pooler"))
    assert with_pooler.untrained_weights == ()
    pooled, _ = extract_features(with_pooler, dataset, "image", "label", pooling="pooler")
    assert pooled.shape == (4, 24)


def test_random_init_copies_the_shape_of_a_checkpoint_and_is_seeded(tmp_path, tiny_mimco_config):
    MimCoForPreTraining(tiny_mimco_config(hidden_size=48, num_attention_heads=4)).save_pretrained(tmp_path / "ckpt")
    first = load_backbone(RANDOM_INIT, random_init_config=str(tmp_path / "ckpt"), seed=1)
    again = load_backbone(RANDOM_INIT, random_init_config=str(tmp_path / "ckpt" / "config.json"), seed=1)
    other = load_backbone(RANDOM_INIT, random_init_config=str(tmp_path / "ckpt"), seed=2)
    assert isinstance(first.model, MimCoModel) and first.feature_dim == 48
    weight = "embeddings.patch_embeddings.projection.weight"
    assert torch.equal(first.model.state_dict()[weight], again.model.state_dict()[weight])
    assert not torch.equal(first.model.state_dict()[weight], other.model.state_dict()[weight])
    assert load_backbone(RANDOM_INIT, model_preset="tiny").feature_dim == 64


def test_classification_splits_fall_back_to_a_stratified_split_and_encode_string_labels(tmp_path):
    names = ["cat", "dog", "eel"]
    dataset = _image_dataset(num_images=30).cast_column("label", datasets.Value("int64"))
    dataset = dataset.map(lambda example: {"label": names[example["label"]]})
    path = str(tmp_path / "data.parquet")
    dataset.to_parquet(path)
    data = load_classification_splits(data_files=[path], train_val_split=0.2, seed=0)
    assert data.class_names == names and data.eval_split.startswith("train[split off")
    assert len(data.train) == 24 and len(data.eval) == 6
    assert sorted(data.eval[data.label_column]) == [0, 0, 1, 1, 2, 2]  # stratified
    assert data.id2label == {0: "cat", 1: "dog", 2: "eel"}
    with pytest.raises(ValueError, match="train_val_split"):
        load_classification_splits(data_files=[path], train_val_split=0.0)
    digits = load_classification_splits(max_train_samples=50)
    assert digits.eval_split == "validation" and len(digits.train) == 50 and digits.num_labels == 10


@pytest.mark.skipif(not CIFAR10_DIR.is_dir(), reason=f"CIFAR-10 parquet not found at {CIFAR10_DIR}")
def test_cifar10_parquet_gives_img_column_and_test_split(tiny_mimco_config):
    data = load_classification_splits(dataset_name=str(CIFAR10_DIR), max_train_samples=40, max_eval_samples=20)
    assert (data.image_column, data.label_column, data.eval_split) == ("img", "label", "test")
    assert data.num_labels == 10 and "airplane" in data.class_names
    backbone = load_backbone(RANDOM_INIT, model_preset="tiny")
    features, labels = extract_features(backbone, data.eval, data.image_column, data.label_column, batch_size=8)
    assert features.shape == (20, 64) and labels.max() < 10


def test_results_table_names_the_knn_settings_it_was_measured_with():
    row = {
        "name": "m",
        "linear_probe_top1": 0.5,
        "knn_top1": 0.25,
        "feature_dim": 8,
        "num_train_images": 4,
        "num_test_images": 2,
    }
    assert "| kNN top-1 (k=20, T=0.07) |" in results_table([row])
    table = results_table([row], knn_k=5, knn_temperature=0.1)
    assert "| kNN top-1 (k=5, T=0.1) |" in table and "k=20" not in table
    assert "| m | 50.0% | 25.0% | 8 | 4 / 2 |" in table


def test_skipped_links_of_a_train_dir_are_reported_once_for_all_splits(tmp_path, caplog):
    from test_data import _link_folder

    folder, expected = _link_folder(tmp_path)
    with caplog.at_level("WARNING", logger="modeling_mimco.data.pipeline"):
        data = load_classification_splits(train_dir=folder, cache_dir=str(tmp_path / "cache"), train_val_split=0.4)
    assert len(data.train) + len(data.eval) == 5
    warnings = [record.getMessage() for record in caplog.records if "symbolic link" in record.getMessage()]
    assert len(warnings) == 1 and f"{len(expected)} symbolic link(s) skipped" in warnings[0]


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def test_probe_names_a_checkpoint_that_does_not_load(tmp_path, tiny_mimco_config, no_network):
    script = load_script("run_linear_probe")
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(ValueError) as info:
        script._load_backbone(missing, script.ModelArguments(model_name_or_path=[missing]), 0, None)
    assert str(info.value).startswith(f"--model_name_or_path {missing!r}: no such file or folder here")
    MimCoModel(tiny_mimco_config()).save_pretrained(tmp_path / "damaged")
    _truncate_weights(tmp_path / "damaged")
    damaged = str(tmp_path / "damaged")
    with pytest.raises(ValueError, match=r"--model_name_or_path '.*damaged': a weights file in it is damaged"):
        script._load_backbone(damaged, script.ModelArguments(model_name_or_path=[damaged]), 0, None)
    # random-init reads only --random_init_config from disk
    arguments = script.ModelArguments(model_name_or_path=[RANDOM_INIT], random_init_config=missing)
    with pytest.raises(ValueError, match=r"^--random_init_config '.*no_such_folder': no such file or folder"):
        script._load_backbone(RANDOM_INIT, arguments, 0, None)


# ---------------------------------------------------------------------------------------------------------------------
# the script


@pytest.mark.slow
def test_run_linear_probe_compares_two_models_and_writes_json_and_png(tmp_path, tiny_mimco_config, no_network):
    script = load_script("run_linear_probe")
    torch.manual_seed(0)
    MimCoModel(tiny_mimco_config()).save_pretrained(tmp_path / "saved")
    output_dir = tmp_path / "out"
    report = script.main(
        ["--model_name_or_path", str(tmp_path / "saved"), RANDOM_INIT, "--random_init_config", str(tmp_path / "saved")]
        + ["--output_dir", str(output_dir), "--plot", "--max_train_samples", "200", "--max_eval_samples", "60"]
        + ["--probe_epochs", "10", "--batch_size", "64", "--tsne_max_points", "50"]
    )
    results = json.loads((output_dir / "linear_probe_results.json").read_text())
    assert results["models"] == report["models"]
    assert [model["name"] for model in results["models"]] == ["saved", RANDOM_INIT]
    for model in results["models"]:
        assert model["feature_dim"] == 32
        assert model["num_train_images"] == 200 and model["num_test_images"] == 60
        assert 0.0 <= model["linear_probe_top1"] <= 1.0 and 0.0 <= model["knn_top1"] <= 1.0
    assert results["num_classes"] == 10 and results["knn"] == {"k": 20, "temperature": 0.07}
    png = (output_dir / "tsne.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = PIL.Image.open(io.BytesIO(png)).size
    assert width > height  # two panels side by side


@pytest.mark.slow
def test_rows_measured_apart_give_the_report_of_one_run(tmp_path, tiny_mimco_config, no_network):
    """Rows measured apart (`measure_models`, as the demo measures its rows in two processes) make, with
    `report_results`, the same report as one run over all the models."""
    script = load_script("run_linear_probe")
    torch.manual_seed(0)
    MimCoModel(tiny_mimco_config()).save_pretrained(tmp_path / "saved")
    flags = ["--random_init_config", str(tmp_path / "saved"), "--max_train_samples", "120", "--max_eval_samples"]
    flags += ["40", "--probe_epochs", "5", "--batch_size", "64"]
    parser = HfArgumentParser((script.ModelArguments, script.DataArguments, script.EvaluationArguments))

    def arguments(models: list[str], output_dir: str) -> tuple:
        return parser.parse_args_into_dataclasses(
            args=["--model_name_or_path", *models, "--output_dir", str(tmp_path / output_dir), *flags]
        )

    whole = script.run_linear_probe(*arguments([PIXELS, RANDOM_INIT, str(tmp_path / "saved")], "whole"))
    earlier = script.measure_models(*arguments([PIXELS, RANDOM_INIT], "apart"))
    later = script.measure_models(*arguments([str(tmp_path / "saved")], "apart"))
    assert not (tmp_path / "apart").exists()  # measuring writes nothing
    _, data_args, eval_args = arguments([PIXELS], "apart")
    data = load_labelled_splits(data_args, eval_args.seed)
    apart = script.report_results([*earlier, *later], data, data_args, eval_args)
    assert [row["name"] for row in apart["models"]] == [PIXELS, RANDOM_INIT, "saved"]
    assert apart["models"] == whole["models"]
    assert json.loads((tmp_path / "apart" / "linear_probe_results.json").read_text())["models"] == whole["models"]


def test_pixels_baseline_features_are_the_normalised_images():
    backbone = load_backbone("pixels", model_preset="tiny")
    assert backbone.num_prefix_tokens == 0 and backbone.feature_dim == 3 * 32 * 32
    data = load_classification_splits(max_train_samples=12, max_eval_samples=6)
    features, labels = extract_features(backbone, data.train, data.image_column, data.label_column, batch_size=5)
    transform = build_eval_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    first = data.train[0]
    expected = transform(decode_image(first[data.image_column])).flatten()
    assert features.shape == (12, 3 * 32 * 32)
    assert torch.allclose(features[0], expected, atol=1e-6)
    assert labels[0] == first[data.label_column]
    mean_pooled, _ = extract_features(
        backbone, data.train, data.image_column, data.label_column, pooling="mean", batch_size=5
    )
    assert torch.equal(mean_pooled, features)
