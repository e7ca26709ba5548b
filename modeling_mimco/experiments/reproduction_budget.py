"""The reproduction's step plan: the pre-training steps that fit `--budget_minutes`, from a few timed synthetic steps
of each objective, and the compute-matched step count of the pixel-MIM row that costs what MimCo's teacher and student
cost together."""

from __future__ import annotations

import time

from modeling_mimco.experiments.reproduction_arguments import (
    COMPUTE_MATCHED_ROW,
    EVAL_SECONDS_PER_ROW,
    FIXED_SECONDS,
    HEAD_HIDDEN_SIZE,
    PROJECTION_SIZE,
    PROJECTOR_HIDDEN_SIZE,
    ROW_KINDS,
    UNTRAINED_KINDS,
    backbone_kwargs,
    given_teacher,
    wanted_rows,
)


def time_pretraining_steps(args, repeats: int = 3) -> dict[str, float]:
    """Seconds per optimizer step of each objective at the run's batch size, on synthetic tensors (1 warm-up step), on
    the device pre-training will use (the GPU when there is one, as Accelerate picks it).

    On a CPU the seconds are this process's CPU time, not the wall clock: on a machine shared with other work the wall
    clock of a few steps moves with the load (one plan timed the student's step at 0.36 s and pixel MIM's at 0.50 s,
    the wrong way round, and sized the compute-matched row below the others), while the CPU time of one thread does
    not."""
    import torch
    from transformers import ViTForMaskedImageModeling

    from modeling_mimco import (
        MimCoConfig,
        MimCoContrastiveConfig,
        MimCoForContrastivePreTraining,
        MimCoForPreTraining,
    )
    from modeling_mimco.experiments.pixel_mim import vit_config_like

    shape = backbone_kwargs(args)
    batch = args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pixels = torch.randn(batch, 3, shape["image_size"], shape["image_size"], device=device)
    contrastive = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(
            backbone_config=MimCoConfig(**shape, position_embedding_type="sincos"),
            projector_hidden_size=PROJECTOR_HIDDEN_SIZE,
            projection_size=PROJECTION_SIZE,
        )
    )
    student = MimCoForPreTraining(
        MimCoConfig(**shape, head_hidden_size=HEAD_HIDDEN_SIZE, teacher_config=MimCoConfig(**shape))
    )
    simmim = ViTForMaskedImageModeling(vit_config_like(MimCoConfig(**shape)))
    for model in (contrastive, student, simmim):
        model.to(device)
    mask = student.mask_generator.batch(batch).to(device)
    objectives = {
        "contrastive": (contrastive, lambda: contrastive(pixel_values_1=pixels, pixel_values_2=pixels).loss),
        "mimco": (student, lambda: student(pixels, bool_masked_pos=mask).loss),
        "simmim": (simmim, lambda: simmim(pixels, bool_masked_pos=mask).loss),
    }
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    seconds = {}
    for name, (model, loss_fn) in objectives.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for step in range(repeats + 1):
            if step == 1:
                _synchronize(device)
                start = clock()
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        seconds[name] = (clock() - start) / repeats
    return seconds


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_matched_steps(steps: int, step_seconds: dict[str, float], include_teacher: bool = True) -> int:
    """The pixel-MIM steps that cost what MimCo's teacher and student cost together at `steps` steps each (or the
    student alone, `include_teacher=False`, when the teacher is given), from the measured seconds per step of the
    three objectives (same batch, same backbone)."""
    teacher_seconds = step_seconds["contrastive"] if include_teacher else 0.0
    ratio = (teacher_seconds + step_seconds["mimco"]) / step_seconds["simmim"]
    return max(int(round(steps * ratio)), 1)


def plan_steps(args, step_seconds: dict[str, float], num_seeds: int = 1) -> dict:
    """Derives the pre-training step count (the same for every pre-trained row but the compute-matched one) from the
    budget, for `num_seeds` pre-training seeds that share one teacher (trained and evaluated once).

    The synthetic step timings are used as they are: real steps also decode and augment images, but one loader worker
    on the second core hides that (real steps took 0.9-0.95x the synthetic timing, which includes warm-up)."""
    selected = wanted_rows(args)
    train_teacher = given_teacher(args) is None
    matched_ratio = compute_matched_steps(1000, step_seconds, train_teacher) / 1000
    per_step = 0.0
    for key in selected:
        kind = ROW_KINDS[key][1]
        if kind in UNTRAINED_KINDS or (key == "teacher" and not train_teacher):
            continue
        cost = step_seconds[kind] * (matched_ratio if key == COMPUTE_MATCHED_ROW else 1.0)
        per_step += cost if key == "teacher" else cost * num_seeds
    evaluated = len(selected) * num_seeds - ((num_seeds - 1) if "teacher" in selected else 0)
    per_row = args.eval_seconds_per_row if args.eval_seconds_per_row is not None else EVAL_SECONDS_PER_ROW
    fixed = args.fixed_seconds if args.fixed_seconds is not None else FIXED_SECONDS
    reserve = fixed + per_row * evaluated
    available = max(args.budget_minutes * 60.0 - reserve, 0.0)
    steps = max(int(available / per_step) // 10 * 10, 20) if per_step > 0 else 20
    return {
        "pretrain_steps": steps,
        "matched_pixel_mim_steps": compute_matched_steps(steps, step_seconds, train_teacher),
        "num_seeds": num_seeds,
        "measured_seconds_per_step": {k: round(v, 4) for k, v in step_seconds.items()},
        "seconds_reserved_for_evaluation": reserve,
        "estimated_pretraining_minutes": round(steps * per_step / 60.0, 1),
    }


def row_steps(settings: dict, key: str) -> int:
    """A row's pre-training steps: the shared count, or the compute-matched count for the matched pixel-MIM row."""
    if key == COMPUTE_MATCHED_ROW:
        return settings["matched_pixel_mim_steps"]
    return settings["pretrain_steps"]
