#!/usr/bin/env python
"""`make demo`: both MimCo stages on the built-in digits data, then a frozen-feature evaluation; CPU, no network.

1. Stage 1 trains a tiny MoCo v3 teacher.
2. Stage 2 trains a MimCo student against it.
3. A linear probe and a weighted k-NN classifier measure the normalised pixels (the baseline that learned features
   must beat) and the CLS features of an untrained model of the student's shape, the teacher and the student
   (`run_linear_probe.py`, one command for all four), and a t-SNE picture of their test features is written.

The script prints how the losses moved, a table of the accuracies and where the checkpoints and the picture are.

Settings that differ from the paper-scale defaults, for 300-step runs of a 4-layer, 64-wide ViT on 32-px digits:
base learning rates 5e-3 (stage 1) and 1.5e-3 (stage 2), and an image-level temperature of 0.05 instead of 0.2. The
tiny teacher's CLS features all point almost the same way (mean pairwise cosine about 0.9996), so at 0.2 the
image-level InfoNCE logits hardly differ between images and that loss stays at its chance value, ln(batch size).
"""

from __future__ import annotations

import argparse
import os

import torch

from modeling_mimco.commands import run_contrastive_pretraining, run_linear_probe, run_pretraining
from modeling_mimco.evaluation import results_table


def loss_summary(name: str, log_history: list[dict], keys: tuple[str, ...]) -> str:
    first, last = log_history[0], log_history[-1]
    lines = [f"{name}: {last['step']} steps, {last['images_per_second']:.0f} images/s at the end"]
    for key in keys:
        if key in first:
            lines.append(
                f"  {key:<11} {first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--stage1_steps", type=int, default=300)
    parser.add_argument("--stage2_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads (0: leave torch's default). The demo's tiny models run fastest on one thread, and "
        "much faster than on two when the CPU is shared with other work.",
    )
    parser.add_argument("--skip_pretraining", action="store_true", help="Evaluate the checkpoints already there.")
    parser.add_argument(
        "--teacher_autocast", choices=["bf16"], default=None, help="Run stage 2's frozen teacher under bf16 autocast."
    )
    args = parser.parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)

    teacher_dir = os.path.join(args.output_dir, "teacher")
    student_dir = os.path.join(args.output_dir, "student")
    evaluation_dir = os.path.join(args.output_dir, "evaluation")
    common = ["--model_preset", "tiny", "--per_device_train_batch_size", str(args.batch_size), "--logging_steps", "25"]
    common += ["--report_to", "none", "--warmup_ratio", "0.05"]

    summaries = []
    if not args.skip_pretraining:
        stage1 = run_contrastive_pretraining.main(
            ["--output_dir", teacher_dir, "--max_train_steps", str(args.stage1_steps), "--projector_hidden_size"]
            + ["512", "--projection_size", "128", "--checkpointing_steps", "100", "--learning_rate", "5e-3"]
            + common
        )
        stage2 = run_pretraining.main(
            ["--teacher_name_or_path", teacher_dir, "--output_dir", student_dir, "--max_train_steps"]
            + [str(args.stage2_steps), "--head_hidden_size", "256", "--checkpointing_steps", "100"]
            + ["--learning_rate", "1.5e-3", "--image_temperature", "0.05"]
            + (["--teacher_autocast", args.teacher_autocast] if args.teacher_autocast else [])
            + common
        )
        summaries.append(loss_summary("Stage 1 (MoCo v3 teacher)", stage1.log_history, ("loss",)))
        summaries.append(
            loss_summary("Stage 2 (MimCo student)", stage2.log_history, ("loss", "patch_loss", "image_loss"))
        )

    # Stage 3: frozen features of the three models and of the raw pixels (the baseline), one command;
    # "random-init" and "pixels" copy the student's shape.
    report = run_linear_probe.main(
        ["--model_name_or_path", "pixels", "random-init", teacher_dir, student_dir]
        + ["--model_names", "raw pixels", "random init", "teacher (MoCo v3, stage 1)", "student (MimCo, stage 2)"]
        + ["--random_init_config", student_dir, "--output_dir", evaluation_dir, "--plot"]
    )

    print()
    for summary in summaries:
        print(summary)
    print()
    print(
        f"Frozen CLS features on digits ({report['models'][0]['num_train_images']} train / "
        f"{report['models'][0]['num_test_images']} test images, {report['num_classes']} classes; chance 10%):"
    )
    print(results_table(report["models"], knn_k=report["knn"]["k"], knn_temperature=report["knn"]["temperature"]))
    print()
    print(f"Teacher:  {teacher_dir}  (MimCoModel; resumable checkpoints in {teacher_dir}/checkpoints)")
    print(f"Student:  {student_dir}  (MimCoForPreTraining; loads as MimCoModel or MimCoForImageClassification)")
    print(f"Results:  {report['results_file']}")
    print(f"t-SNE:    {report['plot_file']}")
    return report


if __name__ == "__main__":
    main()
