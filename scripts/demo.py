#!/usr/bin/env python
"""`make demo`: both MimCo stages on the built-in digits data, on a CPU, with no network.

Stage 1 trains a tiny MoCo v3 teacher; stage 2 trains a MimCo student against it. The script prints where the
checkpoints are and how the losses moved.
"""

from __future__ import annotations

import argparse
import os

import run_contrastive_pretraining
import run_pretraining


def loss_summary(name: str, log_history: list[dict], keys: tuple[str, ...]) -> str:
    first, last = log_history[0], log_history[-1]
    lines = [f"{name}: {last['step']} steps, {last['images_per_second']:.0f} images/s at the end"]
    for key in keys:
        if key in first:
            lines.append(
                f"  {key:<11} {first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--stage1_steps", type=int, default=300)
    parser.add_argument("--stage2_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    teacher_dir = os.path.join(args.output_dir, "teacher")
    student_dir = os.path.join(args.output_dir, "student")
    common = ["--model_preset", "tiny", "--per_device_train_batch_size", str(args.batch_size), "--logging_steps", "25"]
    common += ["--report_to", "none", "--learning_rate", "1.5e-3", "--warmup_ratio", "0.05"]

    stage1 = run_contrastive_pretraining.main(
        ["--output_dir", teacher_dir, "--max_train_steps", str(args.stage1_steps), "--projector_hidden_size", "512"]
        + ["--projection_size", "128", "--checkpointing_steps", "100"]
        + common
    )
    stage2 = run_pretraining.main(
        ["--teacher_name_or_path", teacher_dir, "--output_dir", student_dir, "--max_train_steps"]
        + [str(args.stage2_steps), "--head_hidden_size", "256", "--checkpointing_steps", "100"]
        + common
    )

    print()
    print(loss_summary("Stage 1 (MoCo v3 teacher)", stage1.log_history, ("loss",)))
    print(loss_summary("Stage 2 (MimCo student)", stage2.log_history, ("loss", "patch_loss", "image_loss")))
    print(f"Teacher:  {teacher_dir}  (MimCoModel; resumable checkpoints in {teacher_dir}/checkpoints)")
    print(f"Student:  {student_dir}  (MimCoForPreTraining; loads as MimCoModel or MimCoForImageClassification)")


if __name__ == "__main__":
    main()
