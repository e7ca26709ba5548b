"""Stage 2 of MimCo: pre-train a ViT student by masked image modeling against a frozen contrastive teacher.

One process:            python scripts/run_pretraining.py --teacher_name_or_path TEACHER --output_dir OUT
Several GPUs/machines:  accelerate launch scripts/run_pretraining.py --teacher_name_or_path TEACHER ...

The teacher is a local folder or a Hub id: the output of `run_contrastive_pretraining.py`, a converted MoCo v3 /
DINO checkpoint, or any ViT-like `transformers` backbone. The output folder holds a `MimCoForPreTraining` checkpoint
(student, heads and teacher) that loads as `MimCoModel` or `MimCoForImageClassification`, and its image processor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modeling_mimco.commands import argument_parser, recipe_default, reports_errors, run_command
from modeling_mimco.data.arguments import DataArguments
from modeling_mimco.errors import EXPECTED_ERRORS, describe_load_error
from modeling_mimco.training.arguments import PreTrainingArguments


# torch, transformers' models, Accelerate, datasets and the data pipeline are imported by the functions that use
# them, so that `--help` and a bad flag answer without loading them
if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator

    from modeling_mimco import MimCoConfig, MimCoForPreTraining
    from modeling_mimco.data.pipeline import MimCoPretrainingCollator
    from modeling_mimco.training.loop import TrainingResult
    from modeling_mimco.training.sharding import ShardingPlan


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The student, its teacher and the MimCo objective (the defaults are `MimCoConfig`'s)."""

    teacher_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the frozen teacher."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a teacher whose model code lives in its Hub repository (runs that code)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start the student from this checkpoint (any MimCo folder or Hub id); its shape replaces "
            "--model_preset, --image_size and --mask_patch_size."
        },
    )
    model_preset: str = field(
        default="vit-small-patch16",
        metadata={"help": "Student shape: tiny, tiny-64, vit-small-patch16 or vit-base-patch16."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Input size; defaults to the preset's."})
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth of the student."})
    mask_strategy: str = field(default="random", metadata={"help": "random (SimMIM blocks) or block (BEiT)."})
    mask_ratio: float = field(default=0.6, metadata={"help": "Fraction of patches masked."})
    mask_patch_size: int | None = field(default=None, metadata={"help": "Random-mask block size in pixels."})
    head_hidden_size: int = field(default=2048, metadata={"help": "Hidden width of the heads; 0 for linear heads."})
    patch_loss_type: str = field(default="infonce", metadata={"help": "infonce, cosine or smooth_l1."})
    image_loss_type: str = field(default="infonce", metadata={"help": "infonce, cosine or smooth_l1."})
    patch_negatives: str = field(default="image", metadata={"help": "image or batch."})
    patch_temperature: float = field(default=0.2)
    image_temperature: float = field(default=0.2)
    patch_loss_weight: float = field(default=1.0)
    image_loss_weight: float = field(default=1.0)
    crop_min_scale: float = field(default=0.67, metadata={"help": "Smallest area of the random resized crop."})
    horizontal_flip: bool = field(
        default=True,
        metadata={
            "help": "Flip half of the crops left-right; turn off for images whose mirror is another class "
            "(digits, text)."
        },
    )
    teacher_autocast: str | None = field(
        default=None,
        metadata={"help": "'bf16': the frozen teacher runs under bf16 autocast while the student trains in fp32."},
    )

    def __post_init__(self):
        # the objective's numbers are checked by the model config, which names the same fields
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"--crop_min_scale must lie in (0, 1], got {self.crop_min_scale}.")


@dataclass
class MimCoPreTrainingArguments(PreTrainingArguments):
    """`PreTrainingArguments` with stage 2's paper-scale ImageNet recipe as defaults (the per-device batch is for 8
    GPUs); small runs override these flags."""

    per_device_train_batch_size: int = recipe_default(PreTrainingArguments, "per_device_train_batch_size", 256)
    num_train_epochs: float = recipe_default(PreTrainingArguments, "num_train_epochs", 100)


def student_backbone_kwargs(model_args: ModelArguments) -> dict:
    """The student's shape: that of `--model_name_or_path`, else the preset's (with `--image_size`)."""
    from modeling_mimco import MimCoConfig
    from modeling_mimco.configuration_mimco import BACKBONE_FIELDS, preset_backbone_kwargs

    if model_args.model_name_or_path is None:
        backbone = preset_backbone_kwargs(model_args.model_preset, model_args.image_size)
        if model_args.mask_patch_size is not None:
            backbone["mask_patch_size"] = model_args.mask_patch_size
        return backbone
    try:
        start = MimCoConfig.from_pretrained(model_args.model_name_or_path)
    except EXPECTED_ERRORS as error:
        raise ValueError(describe_load_error("--model_name_or_path", model_args.model_name_or_path, error)) from error
    return {name: getattr(start, name) for name in BACKBONE_FIELDS}


def load_student_weights(model: MimCoForPreTraining, model_name_or_path: str) -> None:
    """Copies the backbone weights of a MimCo checkpoint into the student (its heads start fresh)."""
    from modeling_mimco import MimCoModel

    try:
        start = MimCoModel.from_pretrained(model_name_or_path)
    except EXPECTED_ERRORS as error:
        raise ValueError(describe_load_error("--model_name_or_path", model_name_or_path, error)) from error
    missing, unexpected = model.mimco.load_state_dict(start.state_dict(), strict=False)
    missing = [name for name in missing if "mask_token" not in name]  # a stage-1 encoder never had one
    if missing or unexpected:
        raise ValueError(
            f"--model_name_or_path {model_name_or_path!r} does not fit the student: missing {missing}, "
            f"unexpected {unexpected}."
        )


def build_config(model_args: ModelArguments) -> MimCoConfig:
    """The student's config: `model_args`' shape and objective."""
    from modeling_mimco import MimCoConfig

    backbone = student_backbone_kwargs(model_args)
    return MimCoConfig(
        **backbone,
        drop_path_rate=model_args.drop_path_rate,
        mask_strategy=model_args.mask_strategy,
        mask_ratio=model_args.mask_ratio,
        head_hidden_size=model_args.head_hidden_size,
        patch_loss_type=model_args.patch_loss_type,
        image_loss_type=model_args.image_loss_type,
        patch_negatives=model_args.patch_negatives,
        patch_temperature=model_args.patch_temperature,
        image_temperature=model_args.image_temperature,
        patch_loss_weight=model_args.patch_loss_weight,
        image_loss_weight=model_args.image_loss_weight,
        teacher_autocast=model_args.teacher_autocast,
    )


def build_model(model_args: ModelArguments) -> MimCoForPreTraining:
    """The student of `model_args`' shape and objective, with its frozen teacher loaded."""
    from modeling_mimco import MimCoForPreTraining

    config = build_config(model_args)
    try:
        model = MimCoForPreTraining.from_teacher(
            model_args.teacher_name_or_path, config, trust_remote_code=model_args.trust_remote_code
        )
    except EXPECTED_ERRORS as error:
        raise ValueError(
            describe_load_error("--teacher_name_or_path", model_args.teacher_name_or_path, error)
        ) from error
    if model_args.model_name_or_path is not None:
        load_student_weights(model, model_args.model_name_or_path)
    return model


def build_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MimCoPreTrainingArguments,
    config: MimCoConfig,
    accelerator: Accelerator,
) -> tuple[datasets.Dataset | datasets.IterableDataset, MimCoPretrainingCollator]:
    """This process's share of the training images and the collator that batches them (with masks)."""
    return _data_for_process(
        model_args, data_args, training_args, config, accelerator.process_index, accelerator.num_processes
    )


def _data_for_process(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MimCoPreTrainingArguments,
    config: MimCoConfig,
    process_index: int,
    num_processes: int,
) -> tuple[datasets.Dataset | datasets.IterableDataset, MimCoPretrainingCollator]:
    from modeling_mimco.data.pipeline import build_pretraining_pipeline
    from modeling_mimco.data.sources import load_training_images

    dataset, image_column = load_training_images(
        data_args,
        config.image_size,
        process_index,
        num_processes,
        training_args.seed,
        num_workers=training_args.dataloader_num_workers,
    )
    return build_pretraining_pipeline(
        dataset,
        image_column,
        config,
        model_args.crop_min_scale,
        model_args.horizontal_flip,
        max_image_pixels=data_args.max_image_pixels,
    )


def training_stream_keys(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MimCoPreTrainingArguments,
    process_index: int | None = None,
    num_processes: int | None = None,
    epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[list[str]]:
    """The sample names (`__key__`) of each batch that process `process_index` of `num_processes` trains on in
    `epoch` of a `--streaming` run on WebDataset shards, from batch `start_batch` on (a run resumed mid-epoch starts
    at its checkpoint's `batches_done_in_epoch`).

    The stream is built as `run_pretraining` builds it: the same sources, process split, example transform,
    collator and DataLoader (with `--dataloader_num_workers` workers, each reading its own shards), and the loop's
    `stream_batches`; only the model is left out. Without `process_index` / `num_processes`, those of the launch
    (`accelerate launch`'s environment) are used.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from modeling_mimco.training.loop import build_dataloader, stream_batches

    if not data_args.streaming:
        raise ValueError("training_stream_keys lists the batches of a --streaming run.")
    if process_index is None or num_processes is None:
        # as the Accelerator of a run reads it: `ACCELERATE_USE_CPU=1` makes CPU processes one gloo group
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        process_index, num_processes = state.process_index, state.num_processes
    config = build_config(model_args)
    dataset, collator = _data_for_process(model_args, data_args, training_args, config, process_index, num_processes)
    dataloader, _ = build_dataloader(training_args, dataset, collator)
    for batch in stream_batches(dataloader, dataset, training_args.seed, epoch, start_batch):
        if "keys" not in batch and len(batch["pixel_values"]):  # a batch of unreadable images only has none
            raise ValueError("The stream's samples have no names: training_stream_keys needs WebDataset shards.")
        yield batch.get("keys", [])


def warn_about_accumulation(training_args: MimCoPreTrainingArguments, config: MimCoConfig) -> None:
    if training_args.gradient_accumulation_steps > 1 and "infonce" in (config.patch_loss_type, config.image_loss_type):
        logger.warning(
            "--gradient_accumulation_steps %d with InfoNCE losses: the negatives come from each micro-batch of "
            "--per_device_train_batch_size images (gathered over processes), not from the whole accumulated batch, "
            "so the objective differs from one big batch. Cosine and smooth-L1 losses are unaffected.",
            training_args.gradient_accumulation_steps,
        )


def compute_loss(model, batch: dict, progress: float):
    outputs = model(
        pixel_values=batch["pixel_values"],
        bool_masked_pos=batch["bool_masked_pos"],
        sample_seeds=batch.get("sample_seeds"),  # absent for a stream: drop path then uses torch's generator
    )
    parts = {}
    if outputs.patch_loss is not None:
        parts["patch_loss"] = outputs.patch_loss
    if outputs.image_loss is not None:
        parts["image_loss"] = outputs.image_loss
    return outputs.loss, parts


def save_student(model: MimCoForPreTraining, output_dir: str) -> None:
    """The final folder: the whole `MimCoForPreTraining` checkpoint and its image processor."""
    from modeling_mimco.interop.model_folders import save_image_processor

    model.save_pretrained(output_dir)
    save_image_processor(output_dir, model.config.image_size, model.config.image_mean, model.config.image_std)


def sharding_plan(model: MimCoForPreTraining) -> ShardingPlan:
    """FSDP shards the student block by block (heads and embeddings with the root); the frozen teacher stays whole
    on every process: it takes no gradient and no optimizer state, so sharding it would only add all-gathers."""
    from modeling_mimco.training.sharding import ShardingPlan

    return ShardingPlan(blocks=list(model.mimco.layers), replicated=[model.teacher])


def run_pretraining(
    model_args: ModelArguments, data_args: DataArguments, training_args: MimCoPreTrainingArguments
) -> TrainingResult:
    """Pre-trains the student as `mimco-pretrain` does and saves it to `--output_dir`; returns the run's result."""
    from accelerate.utils import set_seed

    from modeling_mimco.training.loop import create_accelerator, train

    # Everything that can be wrong with the arguments fails here, before any training step.
    set_seed(training_args.seed)  # --seed also fixes the student's initialisation
    model = build_model(model_args)
    accelerator = create_accelerator(training_args)
    dataset, collator = build_data(model_args, data_args, training_args, model.config, accelerator)
    warn_about_accumulation(training_args, model.config)
    if training_args.torch_compile:
        # The whole model, in place, so parameter names (and checkpoints) stay those of the uncompiled model. Its
        # forward has static shapes (every drawn mask hides `num_masked` patches): one graph, no graph breaks.
        model.compile(mode=training_args.torch_compile_mode)

    result = train(
        training_args,
        model,
        dataset,
        collator,
        compute_loss,
        save_student,
        project_name="mimco-pretraining",
        run_config={**vars(model_args), **vars(data_args), **vars(training_args)},
        accelerator=accelerator,
        sharding_plan=sharding_plan(model),
    )
    accelerator.print(f"MimCo student saved to {result.output_dir} after {result.global_step} steps.")
    return result


@reports_errors
def main(argv: list[str] | None = None) -> TrainingResult:
    parser = argument_parser((ModelArguments, DataArguments, MimCoPreTrainingArguments))
    return run_pretraining(*parser.parse_args_into_dataclasses(args=argv))


def cli() -> int:
    """The `mimco-pretrain` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
