"""Fine-tuning (`scripts/run_finetuning.py` with `modeling_mimco.evaluation.frozen_features`'s recipe pieces): layer-wise learning-rate
decay through the Trainer's optimizer hook, the soft-target loss, MixUp / CutMix, loading from every kind of
checkpoint, the recipe's defaults, and an end-to-end run whose output serves `pipeline("image-classification")` here
and as remote code in a process that cannot import this package."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers.clean_process import run_without_package
from helpers.scripts import load_script
from transformers import TrainingArguments, ViTForImageClassification

from modeling_mimco import (
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
)
from modeling_mimco.evaluation.finetuning import FineTuningTrainer, SoftTargetCrossEntropy, build_batch_mixer
from modeling_mimco.training.optimization import layer_decay_parameter_groups


REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["apple", "bird", "car", "dog", "eel"]  # 5 classes, so top-5 accuracy is reported too


finetuning = load_script("run_finetuning")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# layer-wise learning-rate decay


def _expected_layer_id(name: str, num_layers: int) -> int:
    # written out independently of the implementation's regular expression
    parts = name.split(".")
    for marker in ("layers", "layer"):
        if marker in parts:
            return int(parts[parts.index(marker) + 1]) + 1
    if "embeddings" in parts:
        return 0
    return num_layers + 1


def _expects_no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    return parameter.ndim == 1 or name.endswith(("cls_token", "mask_token", "position_embeddings"))


def test_layer_decay_gives_each_parameter_its_documented_learning_rate(tmp_path, tiny_mimco_config):
    num_layers, decay, base_lr, weight_decay = 3, 0.5, 1e-3, 0.05
    model = MimCoForImageClassification(tiny_mimco_config(num_hidden_layers=num_layers, num_labels=4, pooling="mean"))
    model.mimco.embeddings.mask_token.requires_grad_(False)
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=base_lr, weight_decay=weight_decay, report_to="none", use_cpu=True
    )
    trainer = FineTuningTrainer(model=model, args=args, layer_decay=decay)
    optimizer = trainer.create_optimizer()

    group_of = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert id(parameter) not in group_of, "a parameter is in two groups"
            group_of[id(parameter)] = group
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(group_of) == len(trainable)
    assert id(model.mimco.embeddings.mask_token) not in group_of  # frozen parameters are left out

    for name, parameter in trainable.items():
        group = group_of[id(parameter)]
        layer_id = _expected_layer_id(name, num_layers)
        assert group["lr"] == pytest.approx(base_lr * decay ** (num_layers + 1 - layer_id)), name
        assert group["weight_decay"] == (0.0 if _expects_no_weight_decay(name, parameter) else weight_decay), name

    lr = {name: group_of[id(p)]["lr"] for name, p in trainable.items()}
    # spelled out for a few parameters: embeddings lowest, each block `decay` times its successor, head the full rate
    assert lr["mimco.embeddings.patch_embeddings.projection.weight"] == pytest.approx(base_lr * decay**4)
    assert lr["mimco.embeddings.cls_token"] == lr["mimco.embeddings.position_embeddings"] == min(lr.values())
    assert lr["mimco.layers.0.attention.qkv.weight"] == pytest.approx(base_lr * decay**3)
    assert lr["mimco.layers.2.mlp.fc2.weight"] == pytest.approx(base_lr * decay)
    for head in ("classifier.weight", "classifier.bias", "mimco.layernorm.weight", "mimco.pooler_norm.bias"):
        assert lr[head] == pytest.approx(base_lr)
    assert group_of[id(model.classifier.weight)]["weight_decay"] == weight_decay
    assert group_of[id(model.mimco.layers[1].layernorm_before.weight)]["weight_decay"] == 0.0

    # the schedule scales every group alike, so the ratios survive warmup and decay
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    head_lr = group_of[id(model.classifier.weight)]["lr"]
    assert 0 < head_lr < base_lr
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(head_lr * group["lr_scale"])


def test_layer_decay_understands_transformers_vit_names(tiny_vit_teacher_config):
    model = ViTForImageClassification(tiny_vit_teacher_config(num_hidden_layers=2, num_labels=3))
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, weight_decay=0.1, layer_decay=0.1)
    lr_of = {name: group["lr"] for group in groups for name in group["param_names"]}
    assert lr_of["vit.embeddings.patch_embeddings.projection.weight"] == pytest.approx(1e-3)
    assert lr_of["vit.embeddings.cls_token"] == pytest.approx(1e-3)
    assert lr_of["vit.layers.0.attention.q_proj.weight"] == pytest.approx(1e-2)
    assert lr_of["vit.layers.1.mlp.fc2.weight"] == pytest.approx(1e-1)
    assert lr_of["vit.layernorm.weight"] == lr_of["classifier.weight"] == pytest.approx(1.0)
    assert set(lr_of) == {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_parameter_groups(model, 1.0, 0.1, layer_decay=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# loss and batch mixing


def test_soft_target_cross_entropy_matches_torch_and_mixes_linearly():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    outputs = {"logits": logits}
    loss = SoftTargetCrossEntropy(label_smoothing=0.1)
    assert torch.allclose(
        loss(outputs, labels), torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    )
    # mixed targets: the loss is the same mixture of the two hard-label losses
    partner = labels.roll(1)
    lam = 0.3
    soft = lam * torch.nn.functional.one_hot(labels, 5).float() + (1 - lam) * torch.nn.functional.one_hot(partner, 5)
    expected = lam * loss(outputs, labels) + (1 - lam) * loss(outputs, partner)
    assert torch.allclose(loss(outputs, soft), expected, atol=1e-6)
    # gradient accumulation: summed and divided by the Trainer's item count; -100 ignored
    assert torch.allclose(loss(outputs, labels, num_items_in_batch=12), loss(outputs, labels) / 2)
    masked = labels.clone()
    masked[0] = -100
    assert torch.allclose(
        loss(outputs, masked), torch.nn.functional.cross_entropy(logits, masked, label_smoothing=0.1)
    )


def test_batch_mixer_mixes_images_and_labels_of_neighbouring_examples():
    torch.manual_seed(0)
    pixel_values = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 5
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixer = build_batch_mixer(5, mixup_alpha=mixup, cutmix_alpha=cutmix)
        mixed_pixels, soft = mixer(pixel_values, labels)
        assert soft.shape == (8, 5) and soft.dtype.is_floating_point
        assert torch.allclose(soft.sum(1), torch.ones(8))
        for i in range(8):  # torchvision pairs each image with its predecessor in the batch
            allowed = {int(labels[i]), int(labels[i - 1])}
            assert set(soft[i].nonzero().flatten().tolist()) <= allowed
        assert not torch.equal(mixed_pixels, pixel_values)
    assert build_batch_mixer(5, mixup_alpha=0.0, cutmix_alpha=0.0) is None


def test_batches_are_mixed_in_training_and_never_in_evaluation(tmp_path, tiny_mimco_config):
    calls = []

    def recording_mixer(pixel_values, labels):
        calls.append(len(labels))
        return pixel_values, torch.nn.functional.one_hot(labels, 3).float()

    generator = torch.Generator().manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 3} for i in range(8)]
    trainer = FineTuningTrainer(
        model=MimCoForImageClassification(tiny_mimco_config(num_labels=3)),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            max_steps=2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            remove_unused_columns=False,
        ),
        train_dataset=examples,
        eval_dataset=examples,
        compute_loss_func=SoftTargetCrossEntropy(0.1),
        batch_mixer=recording_mixer,
    )
    trainer.evaluate()
    assert calls == []
    trainer.train()
    assert calls == [4, 4]


# ---------------------------------------------------------------------------------------------------------------------
# models and defaults


def _model_args(path, **overrides):
    return finetuning.ModelArguments(model_name_or_path=str(path), **overrides)


def test_models_load_from_every_kind_of_checkpoint(tmp_path, tiny_mimco_config, tiny_vit_teacher_config):
    id2label = dict(enumerate(CLASS_NAMES))
    label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(0)

    pretraining = MimCoForPreTraining(tiny_mimco_config())
    pretraining.save_pretrained(tmp_path / "pretraining")
    model = finetuning.load_model(_model_args(tmp_path / "pretraining"), id2label, label2id)
    assert isinstance(model, MimCoForImageClassification) and not hasattr(model, "teacher")
    assert model.config.pooling == "mean" and model.config.drop_path_rate == 0.1
    assert model.config.id2label == id2label and model.config.label2id == label2id
    assert model.classifier.out_features == 5
    assert torch.equal(model.mimco.layers[1].mlp.fc1.weight, pretraining.mimco.layers[1].mlp.fc1.weight)
    assert model.mimco.layers[-1].drop_path.drop_prob == pytest.approx(0.1)

    contrastive = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(
            backbone_config=tiny_mimco_config(position_embedding_type="sincos"),
            projector_hidden_size=16,
            projection_size=8,
        )
    )
    with torch.no_grad():
        contrastive.momentum_encoder.layers[0].attention.qkv.weight.add_(1.0)
    contrastive.save_pretrained(tmp_path / "contrastive")
    model = finetuning.load_model(_model_args(tmp_path / "contrastive", pooling="cls"), id2label, label2id)
    assert model.config.pooling == "cls"
    assert torch.equal(
        model.mimco.layers[0].attention.qkv.weight, contrastive.momentum_encoder.layers[0].attention.qkv.weight
    )

    vit = ViTForImageClassification(tiny_vit_teacher_config(num_labels=2))
    vit.save_pretrained(tmp_path / "vit")
    model = finetuning.load_model(_model_args(tmp_path / "vit"), id2label, label2id)
    assert isinstance(model, ViTForImageClassification) and model.classifier.out_features == 5
    assert torch.equal(model.vit.embeddings.cls_token, vit.vit.embeddings.cls_token)


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def test_a_checkpoint_that_does_not_load_is_named_with_the_flag(tmp_path, tiny_mimco_config, no_network):
    id2label = dict(enumerate(CLASS_NAMES))
    label2id = {name: i for i, name in id2label.items()}
    missing = tmp_path / "no_such_folder"
    with pytest.raises(ValueError) as info:
        finetuning.load_model(_model_args(missing), id2label, label2id)
    assert str(info.value).startswith(f"--model_name_or_path {str(missing)!r}: no such file or folder here")
    assert "Hub repository id" in str(info.value)

    MimCoForPreTraining(tiny_mimco_config()).save_pretrained(tmp_path / "damaged")
    _truncate_weights(tmp_path / "damaged")
    with pytest.raises(ValueError, match=r"--model_name_or_path '.*damaged': a weights file in it is damaged"):
        finetuning.load_model(_model_args(tmp_path / "damaged"), id2label, label2id)


def test_train_transform_takes_pil_images_and_uint8_tensors():
    data_args = finetuning.DataTrainingArguments(random_erasing=1.0)
    transform = finetuning.build_train_transform(32, [0.5] * 3, [0.5] * 3, data_args)
    torch.manual_seed(0)
    images = (PIL.Image.new("RGB", (40, 48), (200, 10, 10)), torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8))
    for image in images:
        for _ in range(20):  # RandAugment draws its operations: enough draws to include the geometric ones
            pixels = transform(image)
            assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32


def test_recipe_defaults_are_the_documented_ones(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (finetuning.ModelArguments, finetuning.DataTrainingArguments, finetuning.FineTuningArguments)
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path)])
    assert (model_args.layer_decay, model_args.drop_path_rate, model_args.pooling) == (0.65, 0.1, "mean")
    assert (data_args.mixup, data_args.cutmix, data_args.random_erasing) == (0.8, 1.0, 0.25)
    assert (data_args.rand_augment_num_ops, data_args.rand_augment_magnitude) == (2, 9)
    assert training_args.label_smoothing_factor == 0.1 and training_args.weight_decay == 0.05
    assert training_args.lr_scheduler_type == "cosine" and not training_args.remove_unused_columns


# ---------------------------------------------------------------------------------------------------------------------
# end to end


def _write_parquet(path: Path, num_images: int, seed: int, format: str = "PNG") -> list[tuple[bytes, str]]:
    """Noise images with a weak class-dependent tint; string labels."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(-40, 40, (len(CLASS_NAMES), 3))
    rows = []
    for index in range(num_images):
        label = index % len(CLASS_NAMES)
        pixels = np.clip(rng.normal(128, 50, (32, 32, 3)) + tints[label], 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format=format)
        rows.append((buffer.getvalue(), CLASS_NAMES[label]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    data = {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [label for _, label in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return rows


CLEAN_PROCESS = textwrap.dedent(
    """
    import io
    import json

    import PIL.Image
    from transformers import AutoModelForImageClassification, pipeline

    folder, images_path, results_path = sys.argv[1:4]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    images = [PIL.Image.open(io.BytesIO(bytes.fromhex(h))) for h in json.load(open(images_path))]
    predictions = [result[0] for result in classifier(images, top_k=1)]
    json.dump(
        {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "pipeline_class": type(classifier.model).__name__,
            "id2label": {str(k): v for k, v in model.config.id2label.items()},
            "labels": [p["label"] for p in predictions],
            "scores": [p["score"] for p in predictions],
        },
        open(results_path, "w"),
    )
    """
)


@pytest.mark.slow
def test_finetuning_end_to_end_serves_the_image_classification_pipeline(tmp_path, tiny_mimco_config, no_network):
    from transformers import pipeline

    # JPEG training images reach the augmentation as uint8 tensors, PNG validation images as PIL images
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", num_images=40, seed=0, format="JPEG")
    validation = _write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", num_images=15, seed=1)
    torch.manual_seed(0)
    MimCoForPreTraining(tiny_mimco_config()).save_pretrained(tmp_path / "pretrained")
    output_dir = tmp_path / "finetuned"

    metrics = finetuning.main(
        ["--model_name_or_path", str(tmp_path / "pretrained"), "--dataset_name", str(tmp_path / "data")]
        + ["--output_dir", str(output_dir), "--num_train_epochs", "2", "--per_device_train_batch_size", "8"]
        + ["--learning_rate", "3e-3", "--save_strategy", "no", "--eval_crop_pct", "1.0", "--seed", "0"]
        + ["--report_to", "none", "--logging_steps", "1", "--use_cpu", "--dataloader_pin_memory", "false"]
    )
    for key in ("eval_accuracy", "eval_top5_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["eval_top5_accuracy"] >= metrics["eval_accuracy"]
    assert np.isfinite(metrics["train_loss"]) and metrics["epoch"] == 2.0
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["eval_accuracy"] == metrics["eval_accuracy"]

    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert config["pooling"] == "mean" and config["architectures"] == ["MimCoForImageClassification"]
    assert (output_dir / "preprocessor_config.json").is_file()

    # In this process (package imported: a registered class). With a 1.0 crop at the images' own size the pipeline's
    # preprocessing equals the evaluation transform, so its accuracy must be the reported one.
    classifier = pipeline("image-classification", model=str(output_dir))
    assert type(classifier.model).__name__ == "MimCoForImageClassification"
    images = [PIL.Image.open(io.BytesIO(image)) for image, _ in validation]
    predictions = [result[0] for result in classifier(images, top_k=1)]
    accuracy = np.mean([p["label"] == label for p, (_, label) in zip(predictions, validation)])
    assert accuracy == pytest.approx(metrics["eval_accuracy"])

    # In a clean process that cannot import modeling_mimco: the saved code serves both loaders.
    (tmp_path / "images.json").write_text(json.dumps([image.hex() for image, _ in validation]))
    result = run_without_package(
        CLEAN_PROCESS, [output_dir, tmp_path / "images.json", tmp_path / "out.json"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads((tmp_path / "out.json").read_text())
    assert remote["class"] == remote["pipeline_class"] == "MimCoForImageClassification"
    assert remote["module"].startswith("transformers_modules.")
    assert remote["id2label"] == config["id2label"]
    assert remote["labels"] == [p["label"] for p in predictions]
    assert np.allclose(remote["scores"], [p["score"] for p in predictions], atol=1e-5)
