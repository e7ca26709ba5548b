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
with the `evaluate` library and no network (`modeling_mimco.evaluation.metrics.TopKAccuracy`).

The output folder holds the model with `id2label` / `label2id` and its `preprocessor_config.json`, ready for
`pipeline("image-classification", model=OUTPUT_DIR)` (passing `trust_remote_code` where this package is not
installed). `--push_to_hub --hub_model_id ORG/NAME` uploads it once, at the end, through the package's checked upload
(`modeling_mimco.hub.upload.push_to_hub`, as `mimco-push` does: a model card with the eval accuracy, only the model's
files, no access token); the `Trainer` itself never creates a repository or pushes.

Every flag of transformers' `TrainingArguments` is accepted, with the recipe's defaults
(`evaluation.recipes.FINETUNING_TRAINING_DEFAULTS`); `--help` shows the model and data flags and these defaults
without importing torch, `--help_training` every training flag (`commands.parse_with_training_arguments`).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modeling_mimco.commands import parse_with_training_arguments, reports_errors, run_command
from modeling_mimco.data.arguments import LabelledDataArguments
from modeling_mimco.errors import EXPECTED_ERRORS, describe_load_error
from modeling_mimco.evaluation.recipes import FINETUNING_TRAINING_DEFAULTS


# torch, torchvision, transformers' models and Trainer, datasets and the data pipeline are imported by the functions
# that use them, and `FineTuningArguments` (transformers' `TrainingArguments`, whose module imports torch) lives in
# `evaluation.finetuning`, read from here on first use (`__getattr__`): `--help` and a bad model or data flag answer
# without loading them
if TYPE_CHECKING:
    from torchvision.transforms import v2

    from modeling_mimco.data.sources import ClassificationData
    from modeling_mimco.evaluation.finetuning import FineTuningArguments, FineTuningTrainer


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


def build_train_transform(image_size: int, mean, std, data_args: DataTrainingArguments) -> v2.Compose:
    """RandomResizedCrop (bicubic) -> flip -> RandAugment -> float32 -> Normalize -> RandomErasing, for a PIL image or
    a uint8 tensor."""
    import torch
    from torchvision.transforms import v2

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
                # JPEGs arrive as uint8 tensors (`decoding.decode_image(fast_jpeg=True)`), whose geometric operations
                # support nearest and bilinear only
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if data_args.random_erasing > 0:
        steps.append(v2.RandomErasing(p=data_args.random_erasing, value="random"))
    return v2.Compose(steps)


def check_arguments(model_args: ModelArguments, training_args: FineTuningArguments) -> None:
    """Refuses flags that cannot work, before any data or model is loaded."""
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the image column is decoded on the fly.")
    if model_args.pooling not in ("cls", "mean"):
        raise ValueError(f"--pooling must be 'cls' or 'mean', got {model_args.pooling!r}.")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")


def _hub_kwargs(model_args: ModelArguments) -> dict:
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}


def load_model(model_args: ModelArguments, id2label: dict[int, str], label2id: dict[str, int]):
    """The classifier to fine-tune, with a fresh head for the dataset's classes (`model_folders.load_classifier`).

    A `--model_name_or_path` that does not load fails with a `ValueError` naming the flag and the path (`errors.
    describe_load_error`: a missing folder, tried as a Hub id too; a damaged or truncated weights file).
    """
    from modeling_mimco.interop.model_folders import load_classifier

    path = model_args.model_name_or_path
    try:
        return load_classifier(
            path,
            id2label,
            label2id,
            pooling=model_args.pooling,
            drop_path_rate=model_args.drop_path_rate,
            model_preset=model_args.model_preset,
            image_size=model_args.image_size,
            trust_remote_code=model_args.trust_remote_code,
            **_hub_kwargs(model_args),
        )
    except EXPECTED_ERRORS as error:
        if path is None or str(error).startswith(path):  # nothing was read, or our message about its contents
            raise
        raise ValueError(describe_load_error("--model_name_or_path", path, error)) from error


def prepare_datasets(data: ClassificationData, image_processor, data_args: DataTrainingArguments) -> tuple:
    """The training split with the recipe's augmentation and the evaluation split with the evaluation transform, at
    the image processor's size and normalisation; returns `(train_dataset, eval_dataset)`."""
    from modeling_mimco.data.pipeline import PretrainingExampleTransform, apply_example_transform
    from modeling_mimco.data.transforms import build_eval_transform
    from modeling_mimco.interop.model_folders import processor_side

    image_size = processor_side(image_processor)
    mean, std = image_processor.image_mean, image_processor.image_std
    train_transform = build_train_transform(image_size, mean, std, data_args)
    eval_transform = build_eval_transform(image_size, mean, std, crop_pct=data_args.eval_crop_pct)
    limit = {"max_image_pixels": data_args.max_image_pixels}
    train_dataset = apply_example_transform(
        data.train, PretrainingExampleTransform(train_transform, data.image_column, data.label_column, **limit)
    )
    eval_dataset = apply_example_transform(
        data.eval, PretrainingExampleTransform(eval_transform, data.image_column, data.label_column, **limit)
    )
    logger.info(
        f"{len(data.train)} training and {len(data.eval)} evaluation images ({data.eval_split}), "
        f"{data.num_labels} classes; images of {image_size} px."
    )
    return train_dataset, eval_dataset


def scale_learning_rate(model_args: ModelArguments, training_args: FineTuningArguments) -> None:
    """With `--base_learning_rate`, sets `learning_rate = base_learning_rate * global batch size / 256`."""
    if model_args.base_learning_rate is None:
        return
    global_batch = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    training_args.learning_rate = model_args.base_learning_rate * global_batch / 256
    logger.info(
        f"learning_rate = {model_args.base_learning_rate} * {global_batch} / 256 = {training_args.learning_rate:.3g}"
    )


def build_trainer(
    model,
    image_processor,
    train_dataset,
    eval_dataset,
    num_labels: int,
    data_args: DataTrainingArguments,
    model_args: ModelArguments,
    training_args: FineTuningArguments,
) -> FineTuningTrainer:
    """The `FineTuningTrainer` of the recipe: soft-target loss, layer decay, MixUp / CutMix, top-k accuracy.

    It never talks to the Hub and never sees the token (its copy of the arguments, `trainer_arguments`, has
    `push_to_hub` off and no `hub_token`, so that its `training_args.bin` holds none): `--push_to_hub` uploads once,
    at the end, through `modeling_mimco.hub.upload.push_to_hub` (`evaluation.finetuning.push_trainer_output`)."""
    from modeling_mimco.evaluation.finetuning import (
        ClassificationCollator,
        FineTuningTrainer,
        SoftTargetCrossEntropy,
        build_batch_mixer,
        trainer_arguments,
    )
    from modeling_mimco.evaluation.metrics import ClassificationMetrics, reported_top_k, top_k_predictions
    from modeling_mimco.interop.model_folders import processor_side

    trainer_args = trainer_arguments(training_args)
    top_k = max(reported_top_k(num_labels))
    return FineTuningTrainer(
        model=model,
        args=trainer_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=ClassificationCollator(image_size=processor_side(image_processor)),
        processing_class=image_processor,
        compute_metrics=ClassificationMetrics(num_labels),
        preprocess_logits_for_metrics=lambda logits, labels: top_k_predictions(logits, labels, k=top_k),
        compute_loss_func=SoftTargetCrossEntropy(training_args.label_smoothing_factor),
        layer_decay=model_args.layer_decay,
        batch_mixer=build_batch_mixer(
            num_labels, data_args.mixup, data_args.cutmix, data_args.mixup_prob, data_args.mixup_switch_prob
        ),
    )


def train_and_evaluate(trainer: FineTuningTrainer, training_args: FineTuningArguments) -> dict:
    """Trains (saving the model, its config with `id2label` and the image processor) and evaluates, as the flags
    ask; returns the train and eval metrics, also written to `OUTPUT_DIR/{train,eval}_results.json`."""
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
    return metrics


def run_finetuning(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: FineTuningArguments
) -> dict:
    """Fine-tunes and evaluates as `mimco-finetune` does; returns the train and eval metrics.

    `training_args.learning_rate` is set from `--base_learning_rate` when that is given."""
    import transformers

    from modeling_mimco import MimCoForImageClassification
    from modeling_mimco.data.sources import load_labelled_splits
    from modeling_mimco.evaluation.finetuning import push_trainer_output
    from modeling_mimco.interop.model_folders import load_image_processor

    check_arguments(model_args, training_args)
    data = load_labelled_splits(data_args, training_args.seed, cache_dir=model_args.cache_dir, token=model_args.token)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.set_seed(training_args.seed)

    model = load_model(model_args, data.id2label, data.label2id)
    if training_args.push_to_hub and not isinstance(model, MimCoForImageClassification):
        raise ValueError(
            f"--push_to_hub uploads MimCo models only (with their remote code), not {type(model).__name__}."
        )
    image_processor = load_image_processor(
        model_args.model_name_or_path, model.config, model_args.trust_remote_code, **_hub_kwargs(model_args)
    )
    train_dataset, eval_dataset = prepare_datasets(data, image_processor, data_args)
    scale_learning_rate(model_args, training_args)
    trainer = build_trainer(
        model, image_processor, train_dataset, eval_dataset, data.num_labels, data_args, model_args, training_args
    )
    metrics = train_and_evaluate(trainer, training_args)
    if training_args.push_to_hub:
        dataset = data_args.dataset_name or "digits"
        push_trainer_output(trainer, training_args, dataset, data.eval_split, "Upload MimCo fine-tuned model")
    if training_args.do_train:
        logger.info(f"Fine-tuned model saved to {os.path.abspath(training_args.output_dir)}.")
        if isinstance(model, MimCoForImageClassification) and trainer.is_world_process_zero():
            from modeling_mimco.commands.convert_checkpoint import exports_line

            print(exports_line(model.config), flush=True)
    return metrics


def _training_arguments() -> type[FineTuningArguments]:
    from modeling_mimco.evaluation.finetuning import FineTuningArguments

    return FineTuningArguments


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, FineTuningArguments]:
    """The command line (default: the process's arguments) as `run_finetuning`'s three dataclasses: the model and
    data flags first, without torch (`--help` ends there), then the rest into `FineTuningArguments`."""
    return parse_with_training_arguments(
        (ModelArguments, DataTrainingArguments), _training_arguments, FINETUNING_TRAINING_DEFAULTS, argv
    )


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    return run_finetuning(*parse_args(argv))


_HEAVY_NAMES = ("FineTuningArguments", "ClassificationCollator")


def __getattr__(name: str):
    """`FineTuningArguments` and `ClassificationCollator`, defined in `evaluation.finetuning` (which imports torch),
    as names of this module too, imported on first use."""
    if name in _HEAVY_NAMES:
        from modeling_mimco.evaluation import finetuning

        return getattr(finetuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli() -> int:
    """The `mimco-finetune` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
