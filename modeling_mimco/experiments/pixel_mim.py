"""Pixel MIM, the baseline of the studies: SimMIM with transformers' own `ViTForMaskedImageModeling` (an L1 loss on
the masked pixels, decoded by one linear layer and a pixel shuffle), trained exactly like a MimCo student.

`run_pixel_mim` takes the stage-2 command's own argument dataclasses (`run_pretraining.ModelArguments`,
`DataArguments`, `MimCoPreTrainingArguments`), so the baseline gets the student's shape, augmentation, masks
(`MimCoMaskGenerator` with the student's settings), optimizer, schedule, clipping, checkpoints and resume from the
same code, not from a copy of its defaults. The demo, the CIFAR-10 reproduction and the dense-transfer study use it.
"""

from __future__ import annotations

from accelerate.utils import set_seed
from transformers import ViTConfig, ViTForMaskedImageModeling

from modeling_mimco.commands import run_pretraining
from modeling_mimco.configuration_mimco import MimCoConfig
from modeling_mimco.data.pipeline import build_pretraining_pipeline
from modeling_mimco.data.sources import DataArguments, load_training_images
from modeling_mimco.interop.model_folders import save_image_processor
from modeling_mimco.interop.vit_export import vit_shape_kwargs
from modeling_mimco.training.loop import TrainingResult, train


def vit_config_like(config: MimCoConfig) -> ViTConfig:
    """A `ViTConfig` of the MimCo backbone's shape (no dropout, SimMIM's decoder stride = patch size)."""
    return ViTConfig(
        **vit_shape_kwargs(config),
        encoder_stride=config.patch_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def pixel_mim_loss(wrapped_model, batch: dict, progress: float):
    """The loop's loss function: `ViTForMaskedImageModeling`'s own loss on the batch's images and masks."""
    outputs = wrapped_model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
    return outputs.loss, {}


def run_pixel_mim(
    model_args: run_pretraining.ModelArguments,
    data_args: DataArguments,
    training_args: run_pretraining.MimCoPreTrainingArguments,
) -> TrainingResult:
    """Trains `ViTForMaskedImageModeling` as `run_pretraining` would train the MimCo student of these arguments (the
    teacher and the contrastive heads aside) and saves it, with an image processor, to `--output_dir`."""
    student_config = run_pretraining.build_config(model_args)
    set_seed(training_args.seed)  # the seed fixes the initialisation, as for the student
    model = ViTForMaskedImageModeling(vit_config_like(student_config))
    dataset, image_column = load_training_images(
        data_args, student_config.image_size, seed=training_args.seed, num_workers=training_args.dataloader_num_workers
    )
    dataset, collator = build_pretraining_pipeline(
        dataset,
        image_column,
        student_config,
        model_args.crop_min_scale,
        model_args.horizontal_flip,
        max_image_pixels=data_args.max_image_pixels,
    )

    def save_final(unwrapped_model: ViTForMaskedImageModeling, final_dir: str) -> None:
        unwrapped_model.save_pretrained(final_dir)
        save_image_processor(final_dir, student_config.image_size, student_config.image_mean, student_config.image_std)

    return train(
        training_args,
        model,
        dataset,
        collator,
        pixel_mim_loss,
        save_final,
        project_name="pixel-mim",
        run_config={**vars(model_args), **vars(data_args), **vars(training_args)},
    )
