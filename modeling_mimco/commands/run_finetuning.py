"""Fine-tune a MimCo (or any transformers) ViT for image classification with `transformers.Trainer`.

    python scripts/run_finetuning.py --model_name_or_path outputs/demo/student --output_dir outputs/finetuned \\
        --num_train_epochs 10 --per_device_train_batch_size 64
    accelerate launch scripts/run_finetuning.py --model_name_or_path ... --dataset_name ILSVRC/imagenet-1k ...

`--model_name_or_path` is any MimCo checkpoint (a stage-2 `MimCoForPreTraining`, whose teacher and heads are skipped;
a `MimCoModel`, e.g. a stage-1 output folder; a `MimCoForImageClassification`), a stage-1 `contrastive_model` folder,
or any `AutoModelForImageClassification` checkpoint. Without it, a randomly initialised `--model_preset` is trained.

The recipe is the usual ViT fine-tuning one (BEiT / MAE); each part is a flag with the recipe's default: layer-wise
learning-rate decay (`--layer_decay 0.65`), stochastic depth (`--drop_path_rate 0.1`), mean pooling (`--pooling
mean`), RandAugment (`--rand_augment_num_ops 2 --rand_augment_magnitude 9`), random erasing (`--random_erasing 0.25`),
MixUp (`--mixup 0.8`) and CutMix (`--cutmix 1.0`), label smoothing (`--label_smoothing_factor 0.1`), AdamW with
weight decay 0.05 and a cosine schedule with warmup. Top-1 (and top-5 with at least 5 classes) accuracy is computed
with the `evaluate` library and no network (`modeling_mimco.evaluation.TopKAccuracy`).

The output folder holds the model with `id2label` / `label2id` and its `preprocessor_config.json`, ready for
`pipeline("image-classification", model=OUTPUT_DIR)` (passing `trust_remote_code` where this package is not
installed); `--push_to_hub` uploads it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from torchvision.transforms import v2
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    PreTrainedConfig,
    TrainingArguments,
    ViTImageProcessor,
    set_seed,
)

from modeling_mimco import (
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
)
from modeling_mimco.commands import reports_errors, run_command
from modeling_mimco.configuration_mimco import preset_backbone_kwargs
from modeling_mimco.data import (
    MimCoPretrainingCollator,
    PretrainingExampleTransform,
    apply_example_transform,
    build_eval_transform,
)
from modeling_mimco.errors import EXPECTED_ERRORS, describe_load_error
from modeling_mimco.finetuning import FineTuningTrainer, SoftTargetCrossEntropy, build_batch_mixer
from modeling_mimco.metrics import ClassificationMetrics, reported_top_k, top_k_predictions
from modeling_mimco.sources import LabelledDataArguments


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The model to fine-tune and the recipe's model-side settings."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A MimCo checkpoint or any AutoModelForImageClassification checkpoint (folder or Hub id)."},
    )
    model_preset: str = field(
        default="vit-small-patch16", metadata={"help": "Shape of a randomly initialised model (no checkpoint)."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Input size of a randomly initialised model."})
    pooling: str = field(default="mean", metadata={"help": "MimCo models: 'mean' (normalised patch mean) or 'cls'."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last block."})
    layer_decay: float = field(default=0.65, metadata={"help": "Layer-wise learning-rate decay; 1.0 disables it."})
    base_learning_rate: float | None = field(
        default=None,
        metadata={"help": "If set, learning_rate = base_learning_rate * global batch size / 256 (MAE: 5e-4)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets go."})
    model_revision: str = field(default="main")
    token: str | None = field(default=None, metadata={"help": "Hub token; default: HF_TOKEN or the cached login."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for other checkpoints."})


@dataclass
class DataTrainingArguments(LabelledDataArguments):
    """The labelled images (see `LabelledDataArguments`) and their augmentation."""

    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest area of the random resized crop."})
    rand_augment_num_ops: int = field(default=2, metadata={"help": "RandAugment operations per image; 0 disables."})
    rand_augment_magnitude: int = field(default=9, metadata={"help": "RandAugment magnitude (of 31 bins)."})
    random_erasing: float = field(default=0.25, metadata={"help": "Random erasing probability (random pixels)."})
    mixup: float = field(default=0.8, metadata={"help": "MixUp alpha; 0 disables."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha; 0 disables."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch at all."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix instead of MixUp."})
    eval_crop_pct: float = field(default=0.875, metadata={"help": "Eval: resize to size / crop_pct, center crop."})


@dataclass
class FineTuningArguments(TrainingArguments):
    """`TrainingArguments` with the fine-tuning recipe's defaults (every other flag as in transformers)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the head (AdamW)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, tokens)."})
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of all steps if < 1."})
    num_train_epochs: float = field(default=100.0)
    per_device_train_batch_size: int = field(default=64)
    per_device_eval_batch_size: int = field(default=128)
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing of the training loss."})
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    logging_steps: float = field(default=50)
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the image column is decoded on the fly."}
    )
    do_train: bool = field(default=True)
    do_eval: bool = field(default=True)


class ClassificationCollator(MimCoPretrainingCollator):
    """Stacks `pixel_values` and `labels`, dropping unreadable images (without a mask, without the skip count)."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch.pop("num_skipped", None)
        return batch


def build_train_transform(image_size: int, mean, std, data_args: DataTrainingArguments) -> v2.Compose:
    """RandomResizedCrop (bicubic) -> flip -> RandAugment -> float32 -> Normalize -> RandomErasing, for a PIL image or
    a uint8 tensor."""
    steps = [
        v2.RandomResizedCrop(
            image_size,
            scale=(data_args.crop_min_scale, 1.0),
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(),
    ]
    if data_args.rand_augment_num_ops > 0:
        steps.append(
            v2.RandAugment(
                num_ops=data_args.rand_augment_num_ops,
                magnitude=data_args.rand_augment_magnitude,
                # JPEGs arrive as uint8 tensors (`data.decode_image(fast_jpeg=True)`), whose geometric operations
                # support nearest and bilinear only
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if data_args.random_erasing > 0:
        steps.append(v2.RandomErasing(p=data_args.random_erasing, value="random"))
    return v2.Compose(steps)


def load_model(model_args: ModelArguments, id2label: dict[int, str], label2id: dict[str, int]):
    """The classifier to fine-tune, with a fresh head for the dataset's classes.

    A `--model_name_or_path` that does not load fails with a `ValueError` naming the flag and the path (`errors.
    describe_load_error`: a missing folder, tried as a Hub id too; a damaged or truncated weights file).
    """
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    path = model_args.model_name_or_path
    if path is None:
        config = MimCoConfig(
            **preset_backbone_kwargs(model_args.model_preset, model_args.image_size),
            pooling=model_args.pooling,
            drop_path_rate=model_args.drop_path_rate,
            **labels,
        )
        return MimCoForImageClassification(config)
    try:
        return _load_checkpoint(model_args, path, labels)
    except EXPECTED_ERRORS as error:
        if str(error).startswith(path):  # our own message about the checkpoint's contents
            raise
        raise ValueError(describe_load_error("--model_name_or_path", path, error)) from error


def _load_checkpoint(model_args: ModelArguments, path: str, labels: dict):
    """`load_model` for a checkpoint: a MimCo or stage-1 folder by its `model_type`, anything else through
    `AutoModelForImageClassification`."""
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    config_dict = PreTrainedConfig.get_config_dict(path, **hub)[0]
    model_type = config_dict.get("model_type")
    if model_type == MimCoConfig.model_type:
        return MimCoForImageClassification.from_pretrained(
            path,
            pooling=model_args.pooling,
            drop_path_rate=model_args.drop_path_rate,
            ignore_mismatched_sizes=True,
            **labels,
            **hub,
        )
    if model_type == MimCoContrastiveConfig.model_type:
        contrastive = MimCoForContrastivePreTraining.from_pretrained(path, **hub)
        backbone = contrastive.config.backbone_config.to_dict()
        backbone.update(pooling=model_args.pooling, drop_path_rate=model_args.drop_path_rate, **labels)
        model = MimCoForImageClassification(MimCoConfig.from_dict(backbone))
        missing, unexpected = model.mimco.load_state_dict(contrastive.momentum_encoder.state_dict(), strict=False)
        if unexpected or any(not key.startswith("pooler_norm.") for key in missing):
            raise ValueError(f"{path}: encoder weights do not fit (missing {missing}, unexpected {unexpected}).")
        return model

    extra = {}
    for name in ("drop_path_rate",):
        if name in config_dict:
            extra[name] = getattr(model_args, name)
        else:
            logger.warning(f"{config_dict.get('model_type')} models have no `{name}`; --{name} is ignored.")
    return AutoModelForImageClassification.from_pretrained(
        path, ignore_mismatched_sizes=True, trust_remote_code=model_args.trust_remote_code, **labels, **extra, **hub
    )


def load_image_processor(model_args: ModelArguments, model) -> ViTImageProcessor:
    """The checkpoint's image processor if it has one, else a `ViTImageProcessor` for the model's config."""
    if model_args.model_name_or_path is not None:
        try:
            return AutoImageProcessor.from_pretrained(
                model_args.model_name_or_path,
                cache_dir=model_args.cache_dir,
                revision=model_args.model_revision,
                token=model_args.token,
                trust_remote_code=model_args.trust_remote_code,
            )
        except (OSError, ValueError):
            logger.info("The checkpoint has no image processor; building a ViTImageProcessor from its config.")
    config = model.config
    side = getattr(config, "image_size", 224)
    return ViTImageProcessor(
        size={"height": side, "width": side},
        image_mean=list(getattr(config, "image_mean", None) or ViTImageProcessor().image_mean),
        image_std=list(getattr(config, "image_std", None) or ViTImageProcessor().image_std),
    )


def _processor_side(image_processor) -> int:
    """The side of the images the model sees: the processor's crop size if it crops, else its resize size."""
    for size in (getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)):
        if isinstance(size, int):
            return size
        for key in ("height", "shortest_edge"):
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if value:
                return int(value)
    raise ValueError(f"Cannot read the image size of {type(image_processor).__name__}.")


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FineTuningArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the image column is decoded on the fly.")
    if model_args.pooling not in ("cls", "mean"):
        raise ValueError(f"--pooling must be 'cls' or 'mean', got {model_args.pooling!r}.")
    data = data_args.load_splits(training_args.seed, cache_dir=model_args.cache_dir, token=model_args.token)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    # data -> model
    model = load_model(model_args, data.id2label, data.label2id)
    image_processor = load_image_processor(model_args, model)
    image_size = _processor_side(image_processor)
    mean, std = image_processor.image_mean, image_processor.image_std
    train_transform = build_train_transform(image_size, mean, std, data_args)
    eval_transform = build_eval_transform(image_size, mean, std, crop_pct=data_args.eval_crop_pct)
    train_dataset = apply_example_transform(
        data.train, PretrainingExampleTransform(train_transform, data.image_column, data.label_column)
    )
    eval_dataset = apply_example_transform(
        data.eval, PretrainingExampleTransform(eval_transform, data.image_column, data.label_column)
    )
    logger.info(
        f"{len(data.train)} training and {len(data.eval)} evaluation images ({data.eval_split}), "
        f"{data.num_labels} classes; images of {image_size} px."
    )

    if model_args.base_learning_rate is not None:
        global_batch = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size
        )
        training_args.learning_rate = model_args.base_learning_rate * global_batch / 256
        logger.info(
            f"learning_rate = {model_args.base_learning_rate} * {global_batch} / 256 = "
            f"{training_args.learning_rate:.3g}"
        )

    # -> Trainer
    top_k = max(reported_top_k(data.num_labels))
    trainer = FineTuningTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=ClassificationCollator(image_size=image_size),
        processing_class=image_processor,
        compute_metrics=ClassificationMetrics(data.num_labels),
        preprocess_logits_for_metrics=lambda logits, labels: top_k_predictions(logits, labels, k=top_k),
        compute_loss_func=SoftTargetCrossEntropy(training_args.label_smoothing_factor),
        layer_decay=model_args.layer_decay,
        batch_mixer=build_batch_mixer(
            data.num_labels, data_args.mixup, data_args.cutmix, data_args.mixup_prob, data_args.mixup_switch_prob
        ),
    )

    metrics: dict = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the model, its config with id2label, the image processor
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        metrics.update(train_result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name or "digits",
        "tags": ["image-classification", "vision", "mimco"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    if training_args.do_train:
        logger.info(f"Fine-tuned model saved to {os.path.abspath(training_args.output_dir)}.")
    return metrics


def cli() -> int:
    """The `mimco-finetune` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
