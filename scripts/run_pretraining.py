#!/usr/bin/env python
"""Stage 2 of MimCo: pre-train a ViT student by masked image modeling against a frozen contrastive teacher.

One process:            python scripts/run_pretraining.py --teacher_name_or_path TEACHER --output_dir OUT
Several GPUs/machines:  accelerate launch scripts/run_pretraining.py --teacher_name_or_path TEACHER ...

The teacher is a local folder or a Hub id: the output of `run_contrastive_pretraining.py`, a converted MoCo v3 /
DINO checkpoint, or any ViT-like `transformers` backbone. The output folder holds a `MimCoForPreTraining` checkpoint
(student, heads and teacher) that loads as `MimCoModel` or `MimCoForImageClassification`, and its image processor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, set_seed

from modeling_mimco import MimCoConfig, MimCoForPreTraining, MimCoMaskGenerator
from modeling_mimco.data import (
    MimCoPretrainingCollator,
    PretrainingExampleTransform,
    apply_example_transform,
    build_pretraining_transform,
)
from modeling_mimco.training import (
    DataArguments,
    PreTrainingArguments,
    load_training_images,
    preset_backbone_kwargs,
    save_image_processor,
    train,
)


@dataclass
class ModelArguments:
    """The student, its teacher and the MimCo objective (defaults: DESIGN.md's table)."""

    teacher_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the frozen teacher."})
    model_preset: str = field(
        default="vit-small-patch16", metadata={"help": "Student shape: tiny, vit-small-patch16 or vit-base-patch16."}
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


def build_model(model_args: ModelArguments) -> MimCoForPreTraining:
    backbone = preset_backbone_kwargs(model_args.model_preset, model_args.image_size)
    if model_args.mask_patch_size is not None:
        backbone["mask_patch_size"] = model_args.mask_patch_size
    config = MimCoConfig(
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
    )
    try:
        return MimCoForPreTraining.from_teacher(model_args.teacher_name_or_path, config)
    except (ValueError, OSError) as error:
        raise ValueError(f"--teacher_name_or_path {model_args.teacher_name_or_path!r}: {error}") from error


def compute_loss(model, batch: dict, progress: float):
    outputs = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
    parts = {}
    if outputs.patch_loss is not None:
        parts["patch_loss"] = outputs.patch_loss
    if outputs.image_loss is not None:
        parts["image_loss"] = outputs.image_loss
    return outputs.loss, parts


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, PreTrainingArguments))
    # the paper-scale ImageNet recipe (per-device batch for 8 GPUs); small runs override these flags
    parser.set_defaults(per_device_train_batch_size=256, num_train_epochs=100)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        # Everything that can be wrong with the arguments fails here, before any training step.
        set_seed(training_args.seed)  # --seed also fixes the student's initialisation
        model = build_model(model_args)
        config = model.config
        from accelerate import PartialState

        state = PartialState()
        dataset, image_column = load_training_images(
            data_args, config.image_size, state.process_index, state.num_processes
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))

    transform = build_pretraining_transform(
        config.image_size,
        config.image_mean,
        config.image_std,
        crop_scale=(model_args.crop_min_scale, 1.0),
        normalize=False,  # the collator normalises whole batches
    )
    example_transform = PretrainingExampleTransform(
        transform, image_column, draft_for=(config.image_size, model_args.crop_min_scale)
    )
    dataset = apply_example_transform(dataset, example_transform)
    collator = MimCoPretrainingCollator(
        MimCoMaskGenerator.from_config(config),
        image_size=config.image_size,
        normalize_with=(config.image_mean, config.image_std),
    )

    if training_args.torch_compile:
        # in place, so parameter names (and checkpoints) stay those of the uncompiled model
        model.mimco.compile()
        model.teacher.compile()

    def save_final(unwrapped_model: MimCoForPreTraining, output_dir: str) -> None:
        unwrapped_model.save_pretrained(output_dir)
        save_image_processor(output_dir, config.image_size, config.image_mean, config.image_std)

    result = train(
        training_args,
        model,
        dataset,
        collator,
        compute_loss,
        save_final,
        project_name="mimco-pretraining",
        run_config={**vars(model_args), **vars(data_args), **vars(training_args)},
    )
    print(f"MimCo student saved to {result.output_dir} after {result.global_step} steps.")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
