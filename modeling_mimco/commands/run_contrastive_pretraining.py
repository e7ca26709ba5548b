"""Stage 1 of MimCo: pre-train the contrastive teacher (MoCo v3 for ViTs).

One process:            python scripts/run_contrastive_pretraining.py --output_dir OUT
Several GPUs/machines:  accelerate launch scripts/run_contrastive_pretraining.py --output_dir OUT ...

The output folder holds the momentum encoder as a plain `MimCoModel` checkpoint with its image processor, ready for
`run_pretraining.py --teacher_name_or_path OUT`; the whole contrastive model is kept in `OUT/contrastive_model`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modeling_mimco.commands import argument_parser, recipe_default, reports_errors, run_command
from modeling_mimco.data.arguments import DataArguments
from modeling_mimco.training.arguments import PreTrainingArguments


# torch, transformers' models, Accelerate, datasets and the data pipeline are imported by the functions that use
# them, so that `--help` and a bad flag answer without loading them
if TYPE_CHECKING:
    import datasets
    import torch
    from accelerate import Accelerator

    from modeling_mimco import MimCoConfig, MimCoContrastiveConfig, MimCoForContrastivePreTraining
    from modeling_mimco.training.loop import TrainingResult
    from modeling_mimco.training.sharding import ShardingPlan


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The encoder and the MoCo v3 objective."""

    model_preset: str = field(
        default="vit-small-patch16",
        metadata={"help": "Encoder shape: tiny, tiny-64, vit-small-patch16 or vit-base-patch16."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Input size; defaults to the preset's."})
    projector_hidden_size: int = field(default=4096, metadata={"help": "Hidden width of projector and predictor."})
    projection_size: int = field(default=256, metadata={"help": "Output width of projector and predictor."})
    temperature: float = field(default=0.2, metadata={"help": "InfoNCE temperature."})
    momentum: float = field(default=0.99, metadata={"help": "Initial EMA momentum (rises to 1 on a cosine)."})
    momentum_final: float = field(
        default=1.0,
        metadata={
            "help": "EMA momentum at the last step (the cosine's end). Equal to --momentum: a constant momentum, for a "
            "run that is extended step budget by step budget (`make teachers`)."
        },
    )
    freeze_patch_embeddings: bool = field(
        default=True, metadata={"help": "Keep the random patch projection frozen (MoCo v3's stability trick)."}
    )
    export_encoder: str = field(default="momentum", metadata={"help": "Encoder exported as teacher: momentum/base."})
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest area of the random resized crop."})
    horizontal_flip: bool = field(
        default=True,
        metadata={
            "help": "Flip half of the crops left-right; turn off for images whose mirror is another class "
            "(digits, text)."
        },
    )

    augment_on_device: bool = field(
        default=False,
        metadata={
            "help": "The loader decodes and crops; colour jitter, grayscale, blur and solarize run on the whole "
            "batch on the accelerator (same parameters, drawn per image), so that few CPU cores keep a GPU busy."
        },
    )

    def __post_init__(self):
        # the objective's numbers are checked by the model config, which names the same fields
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"--crop_min_scale must lie in (0, 1], got {self.crop_min_scale}.")


@dataclass
class ContrastivePreTrainingArguments(PreTrainingArguments):
    """`PreTrainingArguments` with stage 1's paper-scale ImageNet recipe (MoCo v3) as defaults (the per-device batch
    is for 8 GPUs); small runs override these flags."""

    per_device_train_batch_size: int = recipe_default(PreTrainingArguments, "per_device_train_batch_size", 512)
    weight_decay: float = recipe_default(PreTrainingArguments, "weight_decay", 0.1)
    num_train_epochs: float = recipe_default(PreTrainingArguments, "num_train_epochs", 300)
    warmup_ratio: float = recipe_default(PreTrainingArguments, "warmup_ratio", 0.133)


def build_config(model_args: ModelArguments) -> MimCoContrastiveConfig:
    """The contrastive model of `model_args`: a sin-cos ViT of the preset's shape, its projector and predictor."""
    from modeling_mimco import MimCoConfig, MimCoContrastiveConfig
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    if model_args.export_encoder not in ("momentum", "base"):
        raise ValueError(f"--export_encoder must be 'momentum' or 'base', got {model_args.export_encoder!r}.")
    backbone = MimCoConfig(
        **preset_backbone_kwargs(model_args.model_preset, model_args.image_size),
        position_embedding_type="sincos",
    )
    return MimCoContrastiveConfig(
        backbone_config=backbone,
        projector_hidden_size=model_args.projector_hidden_size,
        projection_size=model_args.projection_size,
        temperature=model_args.temperature,
        momentum=model_args.momentum,
        momentum_final=model_args.momentum_final,
        freeze_patch_embeddings=model_args.freeze_patch_embeddings,
    )


def build_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ContrastivePreTrainingArguments,
    backbone: MimCoConfig,
    accelerator: Accelerator,
) -> datasets.Dataset | datasets.IterableDataset:
    """This process's share of the training images, each turned into two augmented views."""
    from modeling_mimco.data.pipeline import ContrastiveExampleTransform, apply_example_transform
    from modeling_mimco.data.sources import load_training_images
    from modeling_mimco.data.transforms import build_contrastive_transforms

    dataset, image_column = load_training_images(
        data_args,
        backbone.image_size,
        accelerator.process_index,
        accelerator.num_processes,
        training_args.seed,
        num_workers=training_args.dataloader_num_workers,
    )
    transform_1, transform_2 = build_contrastive_transforms(
        backbone.image_size,
        backbone.image_mean,
        backbone.image_std,
        crop_scale=(model_args.crop_min_scale, 1.0),
        hflip=model_args.horizontal_flip,
        photometric_on_device=model_args.augment_on_device,
        normalize=False,  # 8-bit views, normalised in the training step on its device
    )
    example_transform = ContrastiveExampleTransform(
        transform_1, transform_2, image_column, max_image_pixels=data_args.max_image_pixels
    )
    return apply_example_transform(dataset, example_transform)


def finish_views_on_device(batch: dict, backbone: MimCoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of a batch as normalised floats, on the batch's device: the loader hands over 8-bit views
    (normalised here), or with `--augment_on_device` the uint8 crops, whose photometric half is applied here."""
    import torch

    from modeling_mimco.data.contrastive_views import apply_photometric, normalize_views

    views = []
    for view in ("1", "2"):
        pixel_values = batch[f"pixel_values_{view}"]
        parameters = batch.get(f"photometric_{view}")
        if parameters is not None:
            pixel_values = apply_photometric(pixel_values, parameters, backbone.image_mean, backbone.image_std)
        elif pixel_values.dtype == torch.uint8:
            pixel_values = normalize_views(pixel_values, backbone.image_mean, backbone.image_std)
        views.append(pixel_values)
    return views[0], views[1]


def warn_about_accumulation(training_args: ContrastivePreTrainingArguments) -> None:
    if training_args.gradient_accumulation_steps > 1:
        logger.warning(
            "--gradient_accumulation_steps %d in stage 1: the InfoNCE negatives and the BatchNorm statistics come "
            "from each micro-batch (gathered over processes), and the momentum encoder is updated at every "
            "micro-batch, so the run differs from one with the whole accumulated batch. Prefer more processes or a "
            "bigger --per_device_train_batch_size.",
            training_args.gradient_accumulation_steps,
        )


def sharding_plan(model: MimCoForContrastivePreTraining) -> ShardingPlan:
    """FSDP shards the base encoder block by block (projector, predictor and embeddings with the root); the momentum
    encoder and projector stay whole on every process: they take no gradient, and each process computes the keys of
    its images with them (the EMA reads the base encoder's gathered weights, `update_momentum_branch`)."""
    from modeling_mimco.training.sharding import ShardingPlan

    return ShardingPlan(
        blocks=list(model.base_encoder.layers),
        replicated=[model.momentum_encoder, model.momentum_projector],
    )


def run_contrastive_pretraining(
    model_args: ModelArguments, data_args: DataArguments, training_args: ContrastivePreTrainingArguments
) -> TrainingResult:
    """Pre-trains the teacher as `mimco-contrastive` does and exports it to `--output_dir`; returns the run's result."""
    from accelerate.utils import set_seed

    from modeling_mimco import MimCoForContrastivePreTraining
    from modeling_mimco.data.pipeline import ContrastiveCollator
    from modeling_mimco.interop.model_folders import save_image_processor
    from modeling_mimco.training.loop import create_accelerator, train

    config = build_config(model_args)
    backbone = config.backbone_config
    accelerator = create_accelerator(training_args)
    dataset = build_data(model_args, data_args, training_args, backbone, accelerator)
    set_seed(training_args.seed)  # --seed also fixes the initialisation
    model = MimCoForContrastivePreTraining(config)
    warn_about_accumulation(training_args)
    if training_args.torch_compile:
        # The whole model (both encoders, projectors, predictor, loss), in place, so that parameter names stay those
        # of the uncompiled model. The momentum, a float that changes every step, is traced as a symbol after the
        # first recompilation (dynamo's automatic dynamic), so the graph is compiled twice, not once per step.
        model.compile(mode=training_args.torch_compile_mode)

    def compute_loss(wrapped_model, batch: dict, progress: float):
        pixel_values_1, pixel_values_2 = finish_views_on_device(batch, backbone)
        outputs = wrapped_model(
            pixel_values_1=pixel_values_1,
            pixel_values_2=pixel_values_2,
            momentum=model.momentum_at(progress),
            sample_seeds=batch.get("sample_seeds"),
        )
        return outputs.loss, {}

    def save_final(unwrapped_model: MimCoForContrastivePreTraining, output_dir: str) -> None:
        unwrapped_model.export_teacher(output_dir, encoder=model_args.export_encoder)
        save_image_processor(output_dir, backbone.image_size, backbone.image_mean, backbone.image_std)
        unwrapped_model.save_pretrained(os.path.join(output_dir, "contrastive_model"))

    result = train(
        training_args,
        model,
        dataset,
        ContrastiveCollator(image_size=backbone.image_size),  # 8-bit views: the step normalises them
        compute_loss,
        save_final,
        project_name="mimco-contrastive",
        run_config={**vars(model_args), **vars(data_args), **vars(training_args)},
        accelerator=accelerator,
        sharding_plan=sharding_plan(model),
    )
    accelerator.print(f"Contrastive teacher ({model_args.export_encoder} encoder) saved to {result.output_dir}.")
    return result


@reports_errors
def main(argv: list[str] | None = None) -> TrainingResult:
    parser = argument_parser((ModelArguments, DataArguments, ContrastivePreTrainingArguments))
    return run_contrastive_pretraining(*parser.parse_args_into_dataclasses(args=argv))


def cli() -> int:
    """The `mimco-contrastive` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
