"""Two optimizer steps of a tiny MimCo model, either in one process on the global batch or under `accelerate launch`
with each process on its share of it. Used by `tests/test_distributed.py`.

    accelerate launch --multi_gpu --num_processes 2 ... tests/helpers/distributed_step.py OUT stage2 stage1

Each process writes `OUT/{stage}-rank{r}.pt` with the losses (averaged over processes) and the updated weights.
`run_steps(stage)` is the single-process reference on the whole batch.
"""

from __future__ import annotations

import os
import sys

import torch

from modeling_mimco import (
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForPreTraining,
    MimCoMaskGenerator,
)
from modeling_mimco.training.optimization import parameter_groups


GLOBAL_BATCH = 8  # 2 processes x 4 images
NUM_STEPS = 2  # the second step also shows that DDP's reducer saw a gradient for every trainable parameter
LEARNING_RATE = 1e-3
MOMENTUM = 0.99
STAGES = ("stage2", "stage1")
# Stage 1 runs in float64. Its BatchNorm layers (MimCoBatchNorm1d) take the variance as E[x^2] - E[x]^2, which in
# float32 loses enough digits on a batch of 8 that one process and two differ by ~1e-4 in the gradients from
# rounding alone; in float64 any difference left is a real one.
DTYPES = {"stage2": torch.float32, "stage1": torch.float64}


def _backbone(**overrides) -> MimCoConfig:
    values = dict(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        head_hidden_size=32,
        # the per-sample randomness of real recipes, drawn from per-image seeds (`sample_seeds`)
        drop_path_rate=0.1,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    values.update(overrides)
    return MimCoConfig(**values)


def build_model(stage: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if stage == "stage2":
        # the teacher is a randomly initialised (seeded) frozen MimCoModel of the student's shape
        model = MimCoForPreTraining(_backbone())
    elif stage == "stage1":
        config = MimCoContrastiveConfig(
            backbone_config=_backbone(position_embedding_type="sincos"),
            projector_hidden_size=64,
            projection_size=16,
            freeze_patch_embeddings=True,
        )
        model = MimCoForContrastivePreTraining(config)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return model.to(DTYPES[stage])


def _images(generator: torch.Generator) -> torch.Tensor:
    # A colour per image plus noise: pure noise images all look alike to a random ViT, so the BatchNorm statistics
    # of stage 1 would divide by a batch variance that is almost zero and amplify float32 rounding.
    colours = 1.5 * torch.randn(GLOBAL_BATCH, 3, 1, 1, generator=generator)
    return colours + 0.5 * torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)


def make_batches(stage: str) -> list[dict[str, torch.Tensor]]:
    """The same global batches in every process: images and, for stage 2, the masks."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(NUM_STEPS):
        # one seed per image, as the training loop's seeded batches give them
        sample_seeds = torch.arange(GLOBAL_BATCH, dtype=torch.long) * 7919 + step
        if stage == "stage2":
            mask_generator = MimCoMaskGenerator.from_config(_backbone(), generator=generator)
            masks = mask_generator.batch(GLOBAL_BATCH)
            batches.append(
                {"pixel_values": _images(generator), "bool_masked_pos": masks, "sample_seeds": sample_seeds}
            )
        else:
            images = _images(generator)
            second_view = images + 0.3 * torch.randn(images.shape, generator=generator)
            batches.append({"pixel_values_1": images, "pixel_values_2": second_view, "sample_seeds": sample_seeds})
    dtype = DTYPES[stage]
    return [
        {name: value.to(dtype) if value.is_floating_point() else value for name, value in b.items()} for b in batches
    ]


def _loss(model, stage: str, batch: dict) -> torch.Tensor:
    if stage == "stage2":
        return model(
            pixel_values=batch["pixel_values"],
            bool_masked_pos=batch["bool_masked_pos"],
            sample_seeds=batch["sample_seeds"],
        ).loss
    return model(
        pixel_values_1=batch["pixel_values_1"],
        pixel_values_2=batch["pixel_values_2"],
        momentum=MOMENTUM,
        sample_seeds=batch["sample_seeds"],
    ).loss


def run_steps(stage: str, accelerator=None) -> dict:
    """`NUM_STEPS` AdamW steps; under `accelerator`, DDP with this process's contiguous share of each batch."""
    model = build_model(stage).train()
    named_parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # eps 1e-6 instead of 1e-8: a gradient that is zero up to rounding (the key bias of attention, for one) would
    # otherwise take an update of a sizeable fraction of the learning rate in a direction that rounding decides.
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-6)
    rank, world_size = 0, 1
    if accelerator is not None:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        model, optimizer = accelerator.prepare(model, optimizer)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise SystemExit(f"accelerator.prepare returned {type(model).__name__}, not DistributedDataParallel")
    losses, first_gradients = [], None
    for batch in make_batches(stage):
        local = {name: value.chunk(world_size)[rank] for name, value in batch.items()}
        loss = _loss(model, stage, local)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if first_gradients is None:
            # Adam's first step hardly depends on the gradients' scale, so they are compared directly too.
            first_gradients = {name: p.grad.detach().clone() for name, p in named_parameters if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if accelerator is not None:
            loss = accelerator.reduce(loss, reduction="mean")
        losses.append(float(loss))
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    state_dict = {name: value.detach().clone() for name, value in unwrapped.state_dict().items()}
    return {"losses": losses, "gradients": first_gradients, "state_dict": state_dict, "world_size": world_size}


def main(argv: list[str]) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    output_dir, stages = argv[0], argv[1:] or list(STAGES)
    accelerator = Accelerator()
    if accelerator.num_processes != 2 or accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise SystemExit(
            f"expected 2 processes over gloo (MULTI_CPU), got {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on a CPU-only machine set ACCELERATE_USE_CPU=1"
        )
    for stage in stages:
        result = run_steps(stage, accelerator)
        torch.save(result, os.path.join(output_dir, f"{stage}-rank{accelerator.process_index}.pt"))
        accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
