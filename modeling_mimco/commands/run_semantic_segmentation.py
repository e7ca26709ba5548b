"""Semantic segmentation with UperNet on a MimCo backbone, trained with `transformers.Trainer` (`mimco-segment`).

    mimco-segment --model_name_or_path outputs/demo/student --output_dir outputs/segment \\
        --dataset_name scene_parse_150 --reduce_labels --id2label_file ade20k_id2label.json

`--model_name_or_path` is any MimCo checkpoint folder (a stage-2 pre-training folder gives its student; the teacher
and heads are not loaded): `MimCoBackbone.from_pretrained` reads the backbone, which feeds transformers' UperNet head
and auxiliary FCN head (new) in `MimCoForSemanticSegmentation`, the model of transformers'
`UperNetForSemanticSegmentation` on this backbone, with its config (`MimCoUperNetConfig`, `model_type` "upernet").
With `--use_feature_pyramid` (the default) the four feature maps of `--out_indices` (default: blocks at 1/3, 1/2,
2/3 and all of the depth) are resampled to 4x, 2x, 1x and 1/2x of the patch grid, as BEiT / MAE feed UperNet.
Without a checkpoint, a randomly initialised `--model_preset` is trained.

Data (`data.arguments.SegmentationDataArguments`): a Hub dataset in the ADE20K `scene_parse_150` layout (columns
`image` and `annotation`; `--dataset_name`), parquet files (`--train_file` / `--validation_file`, `--data_files`), a
folder of images with a folder of same-named masks (`--train_dir` + `--train_masks_dir`), or, without any, the
built-in synthetic `digit-canvas` set. `--reduce_labels` turns label 0 into the ignore index 255 and lowers the
others by one (ADE20K). Training images and masks get one random resize (`--min_scale`..`--max_scale` of
`--crop_size`), random crop and flip together (the mask with nearest neighbour); evaluation resizes both.

The recipe's defaults are the paper-scale ADE20K ones of BEiT / MAE / MimCo: 512x512 crops, 160k iterations of batch
16 (`--per_device_train_batch_size 2` on 8 GPUs), AdamW lr 1e-4, weight decay 0.05, layer-wise lr decay 0.65,
1500 warmup steps, then linear decay. Metrics: mean IoU, mean accuracy, pixel accuracy and one IoU per class, with
no network (`evaluation.segmentation_metrics`). The output folder holds the model (it reloads with
`UperNetForSemanticSegmentation.from_pretrained` after `import modeling_mimco`, and anywhere else with
`AutoModelForSemanticSegmentation.from_pretrained(..., trust_remote_code=True)` from the model files saved with it),
a `SegformerImageProcessor` and `eval_results.json`, which `mimco-card` reads; `--push_to_hub --hub_model_id ORG/NAME` uploads it once, at the end,
through `hub.upload.push_to_hub`.

Every flag of transformers' `TrainingArguments` is accepted, with the recipe's defaults above
(`evaluation.recipes.SEGMENTATION_TRAINING_DEFAULTS`); `--help` shows the model and data flags and these defaults
without importing torch, `--help_training` every training flag (`commands.parse_with_training_arguments`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modeling_mimco.commands import parse_with_training_arguments, reports_errors, run_command
from modeling_mimco.data.arguments import SegmentationDataArguments
from modeling_mimco.errors import EXPECTED_ERRORS, describe_load_error
from modeling_mimco.evaluation.recipes import SEGMENTATION_TRAINING_DEFAULTS


# torch, transformers' models and Trainer, datasets and the data pipeline are imported by the functions that use
# them, and `SegmentationTrainingArguments` (transformers' `TrainingArguments`, whose module imports torch) lives in
# `evaluation.finetuning`, read from here on first use (`__getattr__`): `--help` and a bad model or data flag answer
# without loading them
if TYPE_CHECKING:
    from transformers import SegformerImageProcessor

    from modeling_mimco import MimCoForSemanticSegmentation
    from modeling_mimco.data.segmentation import SegmentationData
    from modeling_mimco.evaluation.finetuning import FineTuningTrainer, SegmentationTrainingArguments


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The backbone, the UperNet head and the recipe's model-side settings."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A MimCo checkpoint folder or Hub id (any stage); its backbone is loaded."}
    )
    model_preset: str = field(
        default="vit-base-patch16", metadata={"help": "Shape of a randomly initialised backbone (no checkpoint)."}
    )
    out_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": "Blocks (1-based) whose outputs feed UperNet; default: at 1/3, 1/2, 2/3 and all of the depth."
        },
    )
    use_feature_pyramid: bool = field(
        default=True, metadata={"help": "Resample the 4 feature maps to 4x, 2x, 1x and 1/2x of the patch grid."}
    )
    decoder_hidden_size: int = field(default=512, metadata={"help": "Channels of the UperNet head."})
    auxiliary_head: bool = field(default=True, metadata={"help": "Train with UperNet's auxiliary FCN head (0.4)."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last block."})
    layer_decay: float = field(default=0.65, metadata={"help": "Layer-wise learning-rate decay; 1.0 disables it."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets go."})
    model_revision: str = field(default="main")
    token: str | None = field(default=None, metadata={"help": "Hub token; default: HF_TOKEN or the cached login."})


@dataclass
class SegmentationAugmentationArguments(SegmentationDataArguments):
    """The images and masks (see `SegmentationDataArguments`) and their joint augmentation."""

    crop_size: int = field(default=512, metadata={"help": "Side of the training crops and evaluation images."})
    min_scale: float = field(default=0.5, metadata={"help": "Random resize: smallest short side / crop size."})
    max_scale: float = field(default=2.0, metadata={"help": "Random resize: largest short side / crop size."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip half of the training crops left-right."})


def check_arguments(training_args: SegmentationTrainingArguments) -> None:
    """Refuses flags that cannot work, before any data or model is loaded."""
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: images and masks are decoded on the fly.")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")


def default_out_indices(num_layers: int) -> list[int]:
    """Four blocks spread over the depth, the last one included: 4, 6, 8, 12 of 12 (BEiT's), 1, 2, 3, 4 of 4."""
    return sorted({max(1, round(num_layers * fraction)) for fraction in (1 / 3, 1 / 2, 2 / 3, 1)})


def _hub_kwargs(model_args: ModelArguments) -> dict:
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}


def load_backbone_model(model_args: ModelArguments):
    """The `MimCoBackbone` of `--model_name_or_path` (weights loaded) or an untrained one of `--model_preset`."""
    from modeling_mimco import MimCoBackbone, MimCoConfig
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    path = model_args.model_name_or_path
    if path is None:
        shape = MimCoConfig(**preset_backbone_kwargs(model_args.model_preset))
    else:
        try:
            shape = MimCoConfig.from_pretrained(path, **_hub_kwargs(model_args))
        except EXPECTED_ERRORS as error:
            raise ValueError(describe_load_error("--model_name_or_path", path, error)) from error
    out_indices = model_args.out_indices or default_out_indices(shape.num_hidden_layers)
    if len(out_indices) != 4 and model_args.use_feature_pyramid:
        raise ValueError(f"--use_feature_pyramid needs 4 --out_indices, got {out_indices}.")
    settings = {
        "out_indices": list(out_indices),
        "use_feature_pyramid": model_args.use_feature_pyramid,
        "drop_path_rate": model_args.drop_path_rate,
    }
    if path is None:
        return MimCoBackbone(MimCoConfig(**preset_backbone_kwargs(model_args.model_preset), **settings))
    try:
        return MimCoBackbone.from_pretrained(path, **settings, **_hub_kwargs(model_args))
    except EXPECTED_ERRORS as error:
        raise ValueError(describe_load_error("--model_name_or_path", path, error)) from error


def build_model(model_args: ModelArguments, data: SegmentationData) -> MimCoForSemanticSegmentation:
    """UperNet (new head) on the MimCo backbone, the backbone's weights copied from `load_backbone_model`."""
    from modeling_mimco import MimCoForSemanticSegmentation, MimCoUperNetConfig
    from modeling_mimco.data.segmentation import IGNORE_INDEX

    backbone = load_backbone_model(model_args)
    config = MimCoUperNetConfig(
        backbone_config=backbone.config,
        hidden_size=model_args.decoder_hidden_size,
        use_auxiliary_head=model_args.auxiliary_head,
        loss_ignore_index=IGNORE_INDEX,
        num_labels=data.num_labels,
        id2label=data.id2label,
        label2id=data.label2id,
    )
    model = MimCoForSemanticSegmentation(config)
    # strict: every backbone weight must land in UperNet's backbone, or the transfer would be silently partial
    model.backbone.load_state_dict(backbone.state_dict())
    return model


def build_image_processor(
    model_args: ModelArguments, model, data_args: SegmentationAugmentationArguments
) -> SegformerImageProcessor:
    """The processor saved with the model (the one UperNet checkpoints use): resize to `--crop_size`, the
    checkpoint's normalisation, `--reduce_labels`."""
    from transformers import SegformerImageProcessor

    from modeling_mimco.interop.model_folders import load_image_processor

    source = load_image_processor(
        model_args.model_name_or_path, model.config.backbone_config, **_hub_kwargs(model_args)
    )
    return SegformerImageProcessor(
        size={"height": data_args.crop_size, "width": data_args.crop_size},
        image_mean=list(source.image_mean),
        image_std=list(source.image_std),
        do_reduce_labels=data_args.reduce_labels,
    )


def prepare_datasets(data: SegmentationData, image_processor, data_args: SegmentationAugmentationArguments) -> tuple:
    """The training split with the joint augmentation and the evaluation split resized; `(train, eval)`."""
    from modeling_mimco.data.pipeline import apply_example_transform
    from modeling_mimco.data.segmentation import SegmentationExampleTransform, build_segmentation_transforms

    train_transform, eval_transform = build_segmentation_transforms(
        data_args.crop_size,
        image_processor.image_mean,
        image_processor.image_std,
        min_scale=data_args.min_scale,
        max_scale=data_args.max_scale,
        horizontal_flip=data_args.horizontal_flip,
    )
    common = dict(
        image_column=data.image_column,
        annotation_column=data.annotation_column,
        num_labels=data.num_labels,
        reduce=data_args.reduce_labels,
        max_image_pixels=data_args.max_image_pixels,
    )
    train = apply_example_transform(data.train, SegmentationExampleTransform(train_transform, **common))
    evaluation = apply_example_transform(data.eval, SegmentationExampleTransform(eval_transform, **common))
    logger.info(
        f"{len(data.train)} training and {len(data.eval)} evaluation images ({data.eval_split}), {data.num_labels} "
        f"classes; crops of {data_args.crop_size} px."
    )
    return train, evaluation


def build_trainer(
    model, image_processor, train_dataset, eval_dataset, data: SegmentationData, model_args, training_args
) -> FineTuningTrainer:
    """The Trainer with layer-wise lr decay (`FineTuningTrainer`, no batch mixing) and the IoU metrics. It never
    talks to the Hub nor sees the token (`trainer_arguments`: no `training_args.bin` holds it): `--push_to_hub`
    uploads once, at the end, through `evaluation.finetuning.push_trainer_output`."""
    from modeling_mimco.data.segmentation import IGNORE_INDEX, SegmentationCollator
    from modeling_mimco.evaluation.finetuning import FineTuningTrainer, trainer_arguments
    from modeling_mimco.evaluation.segmentation_metrics import SegmentationMetrics, upsampled_predictions

    trainer_args = trainer_arguments(training_args)
    return FineTuningTrainer(
        model=model,
        args=trainer_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=SegmentationCollator(),
        processing_class=image_processor,
        compute_metrics=SegmentationMetrics(data.id2label, IGNORE_INDEX),
        preprocess_logits_for_metrics=upsampled_predictions,
        layer_decay=model_args.layer_decay,
    )


_WORKER_ERROR = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.*)$")


def unwrap_worker_error(error: BaseException) -> BaseException:
    """A DataLoader worker re-raises a bad row's error with the worker's whole traceback in the message; the error
    line at its end is the message that names the row."""
    text = str(error)
    if "DataLoader worker process" not in text:
        return error
    for line in reversed(text.strip().splitlines()):
        match = _WORKER_ERROR.match(line.strip())
        if match:
            return type(error)(match.group(2))
    return error


def train_and_evaluate(trainer: FineTuningTrainer, training_args: SegmentationTrainingArguments) -> dict:
    """Trains (saving the model, its config with `id2label` and the image processor) and evaluates, as the flags
    ask; returns the train and eval metrics, also written to `OUTPUT_DIR/{train,eval}_results.json`."""
    metrics: dict = {}
    try:
        if training_args.do_train:
            train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
            trainer.save_model()
            trainer.log_metrics("train", train_result.metrics)
            trainer.save_metrics("train", train_result.metrics)
            trainer.save_state()
            metrics.update(train_result.metrics)
        if training_args.do_eval:
            eval_metrics = trainer.evaluate()
            trainer.log_metrics("eval", eval_metrics)
            trainer.save_metrics("eval", eval_metrics)
            metrics.update(eval_metrics)
    except EXPECTED_ERRORS as error:
        unwrapped = unwrap_worker_error(error)
        if unwrapped is error:
            raise
        raise unwrapped from None
    return metrics


def run_semantic_segmentation(
    model_args: ModelArguments,
    data_args: SegmentationAugmentationArguments,
    training_args: SegmentationTrainingArguments,
) -> dict:
    """Trains and evaluates UperNet on a MimCo backbone as `mimco-segment` does; returns the train and eval
    metrics."""
    import transformers

    from modeling_mimco.data.segmentation import load_segmentation_splits
    from modeling_mimco.evaluation.finetuning import push_trainer_output

    check_arguments(training_args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    data = load_segmentation_splits(
        data_args, training_args.seed, cache_dir=model_args.cache_dir, token=model_args.token
    )
    transformers.set_seed(training_args.seed)
    model = build_model(model_args, data)
    image_processor = build_image_processor(model_args, model, data_args)
    train_dataset, eval_dataset = prepare_datasets(data, image_processor, data_args)
    trainer = build_trainer(model, image_processor, train_dataset, eval_dataset, data, model_args, training_args)
    metrics = train_and_evaluate(trainer, training_args)
    if training_args.push_to_hub:
        commit_message = "Upload MimCo UperNet segmentation model"
        push_trainer_output(trainer, training_args, data_args.source_name, data.eval_split, commit_message)
    if training_args.do_train:
        logger.info(f"Segmentation model saved to {os.path.abspath(training_args.output_dir)}.")
    return metrics


def _training_arguments() -> type[SegmentationTrainingArguments]:
    from modeling_mimco.evaluation.finetuning import SegmentationTrainingArguments

    return SegmentationTrainingArguments


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, SegmentationAugmentationArguments, SegmentationTrainingArguments]:
    """The command line (default: the process's arguments) as `run_semantic_segmentation`'s three dataclasses: the
    model and data flags first, without torch (`--help` ends there), then the rest into
    `SegmentationTrainingArguments`."""
    return parse_with_training_arguments(
        (ModelArguments, SegmentationAugmentationArguments), _training_arguments, SEGMENTATION_TRAINING_DEFAULTS, argv
    )


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    return run_semantic_segmentation(*parse_args(argv))


def __getattr__(name: str):
    """`SegmentationTrainingArguments`, defined in `evaluation.finetuning` (which imports torch), as a name of this
    module too, imported on first use."""
    if name == "SegmentationTrainingArguments":
        from modeling_mimco.evaluation import finetuning

        return finetuning.SegmentationTrainingArguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli() -> int:
    """The `mimco-segment` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
