"""`make demo`: both MimCo stages and the pixel-MIM baseline on built-in cluttered digits, then a frozen-feature
evaluation; CPU, no network.

Data (`--dataset_name cluttered-digits`, `data/digits.py`): each of scikit-learn's 8x8 digits at a random position
and scale (45-75 % of a 32-px canvas) on a noisy grey background cluttered with pieces of other digits; 6,108 training
and 540 test images (test handwriting unseen). Objects that move among distractors are the case pre-training is for:
a linear classifier on the raw pixels is at chance there. (`--dataset_name digits` gives the earlier demo's centred
digits, on which the raw pixels beat every model.)

1. Stage 1 trains a tiny MoCo v3 teacher.
2. Stage 2 trains a MimCo student against it.
3. Pixel MIM (SimMIM, transformers' `ViTForMaskedImageModeling`) trains with the student's shape, data, masks, steps
   and schedule (`experiments/pixel_mim.py`): the method the paper compares MimCo with.
4. A linear probe and a weighted k-NN classifier measure the normalised pixels (the baseline that learned features
   must beat) and the CLS features of an untrained model of the student's shape, pixel MIM, the teacher and the
   student (one `run_linear_probe` run for all five), and a t-SNE picture of their test features is written.

The script prints how the losses moved, a table of the accuracies, a reading of the table against the demo's aims
(the student above the pixels, above pixel MIM, and within a point of the teacher or above it, on both metrics), and
where the checkpoints and the picture are. One torch thread trains while a loader worker prepares the next batch on
the other core, and freed tensors are kept for the next step (`host_memory.keep_freed_memory`); docs/benchmarks.md has
the wall times and every variant of the data that was tried, with its table.

Settings that differ from the paper-scale defaults, for a 4-layer, 64-wide ViT on 32-px images, chosen by measurement
on the earlier, centred digits (docs/benchmarks.md):
- 200 stage-1 and 600 stage-2 steps of batch 64 (a stage-2 step costs about half a stage-1 step, which runs two
  views through two encoders); 500 teacher steps gave the same teacher on the cluttered digits;
- no horizontal flip in either stage (a mirrored 2, 3, 5 or 7 is no digit) and crops of at least 60 % (stage 1) and
  67 % (stage 2) of the image; MoCo v3's 8 % crops leave a stroke;
- base learning rates 5e-3 (stage 1) and 1.5e-3 (stage 2);
- an image-level temperature of 0.01 instead of 0.2: the tiny teacher's CLS features all point almost the same way,
  so at 0.2 the image-level InfoNCE logits hardly differ between images and that loss stays at its chance value,
  ln(batch size).
"""

from __future__ import annotations

import argparse
import os

import torch

from modeling_mimco.commands import (
    reports_errors,
    run_command,
    run_contrastive_pretraining,
    run_linear_probe,
    run_pretraining,
)
from modeling_mimco.data.digits import CLUTTERED_DIGITS_DATASET
from modeling_mimco.data.sources import DataArguments
from modeling_mimco.evaluation.frozen_features import results_table
from modeling_mimco.experiments.pixel_mim import run_pixel_mim
from modeling_mimco.training.host_memory import keep_freed_memory
from modeling_mimco.training.loop import TrainingResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument(
        "--dataset_name",
        default=CLUTTERED_DIGITS_DATASET,
        help="The built-in data: 'cluttered-digits' (digits placed on cluttered canvases) or 'digits' (the 8x8 "
        "digits upscaled, on which raw pixels beat every model), or any source `mimco-pretrain` reads.",
    )
    parser.add_argument("--stage1_steps", type=int, default=200)
    parser.add_argument(
        "--stage2_steps", type=int, default=600, help="Steps of the MimCo student and of the pixel-MIM baseline."
    )
    parser.add_argument("--skip_pixel_mim", action="store_true", help="Leave the pixel-MIM row out (faster).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="Seed of both stages and of pixel MIM.")
    parser.add_argument("--image_size", type=int, default=32, help="Side of the built-in images.")
    parser.add_argument("--mask_patch_size", type=int, default=None, help="Stage-2 mask block size (preset's).")
    parser.add_argument("--stage1_learning_rate", type=float, default=5e-3)
    parser.add_argument("--stage2_learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--stage1_crop_min_scale", type=float, default=0.6)
    parser.add_argument("--stage2_crop_min_scale", type=float, default=0.67)
    parser.add_argument("--image_temperature", type=float, default=0.01)
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads (0: leave torch's default). The demo's tiny models run fastest on one thread, and "
        "much faster than on two when the CPU is shared with other work.",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=1,
        help="Worker processes that prepare the next batch while the model trains on this one (0: in the training "
        "process). Every image's augmentation comes from its own seed, so the table does not depend on it.",
    )
    parser.add_argument(
        "--mixed_precision", choices=["no", "bf16"], default="no", help="Autocast of both pre-training stages."
    )
    parser.add_argument("--skip_pretraining", action="store_true", help="Evaluate the checkpoints already there.")
    parser.add_argument(
        "--teacher_autocast", choices=["bf16"], default=None, help="Run stage 2's frozen teacher under bf16 autocast."
    )
    return parser.parse_args(argv)


def demo_training_arguments(arguments_class: type, args: argparse.Namespace, output_dir: str, **settings):
    """The loop settings both stages share in the demo (`arguments_class` is a stage's subclass of
    `training.PreTrainingArguments`), plus the stage's own `settings`."""
    return arguments_class(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        logging_steps=25,
        report_to="none",
        warmup_ratio=0.05,
        checkpointing_steps=100,
        dataloader_num_workers=args.dataloader_num_workers,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        **settings,
    )


def demo_data(args: argparse.Namespace) -> DataArguments:
    return DataArguments(dataset_name=args.dataset_name)


def train_teacher(args: argparse.Namespace, teacher_dir: str) -> TrainingResult:
    """Stage 1: a tiny MoCo v3 teacher with narrow projector and predictor."""
    model_args = run_contrastive_pretraining.ModelArguments(
        model_preset="tiny",
        image_size=args.image_size,
        projector_hidden_size=512,
        projection_size=128,
        crop_min_scale=args.stage1_crop_min_scale,
        horizontal_flip=False,
    )
    training_args = demo_training_arguments(
        run_contrastive_pretraining.ContrastivePreTrainingArguments,
        args,
        teacher_dir,
        max_train_steps=args.stage1_steps,
        learning_rate=args.stage1_learning_rate,
    )
    return run_contrastive_pretraining.run_contrastive_pretraining(model_args, demo_data(args), training_args)


def student_arguments(args: argparse.Namespace, teacher_dir: str, output_dir: str) -> tuple:
    """`run_pretraining`'s arguments of the student, which the pixel-MIM row shares (shape, data, masks, loop)."""
    model_args = run_pretraining.ModelArguments(
        teacher_name_or_path=teacher_dir,
        model_preset="tiny",
        image_size=args.image_size,
        mask_patch_size=args.mask_patch_size,
        head_hidden_size=256,
        image_temperature=args.image_temperature,
        teacher_autocast=args.teacher_autocast,
        crop_min_scale=args.stage2_crop_min_scale,
        horizontal_flip=False,
    )
    training_args = demo_training_arguments(
        run_pretraining.MimCoPreTrainingArguments,
        args,
        output_dir,
        max_train_steps=args.stage2_steps,
        learning_rate=args.stage2_learning_rate,
    )
    return model_args, demo_data(args), training_args


def train_student(args: argparse.Namespace, teacher_dir: str, student_dir: str) -> TrainingResult:
    """Stage 2: a tiny MimCo student against that teacher (image-level temperature 0.01, see above)."""
    return run_pretraining.run_pretraining(*student_arguments(args, teacher_dir, student_dir))


def train_pixel_mim(args: argparse.Namespace, teacher_dir: str, pixel_mim_dir: str) -> TrainingResult:
    """The pixel-MIM baseline: SimMIM of the student's shape, with the student's data, masks, steps and schedule."""
    return run_pixel_mim(*student_arguments(args, teacher_dir, pixel_mim_dir))


ROW_NAMES = {
    "pixels": "raw pixels",
    "random": "random init",
    "pixel_mim": "pixel MIM (SimMIM)",
    "teacher": "teacher (MoCo v3, stage 1)",
    "student": "student (MimCo, stage 2)",
}


def evaluate(args: argparse.Namespace, folders: dict[str, str], evaluation_dir: str) -> dict:
    """Frozen CLS features of the models in `folders` (row key -> checkpoint) and of the raw pixels (the baseline),
    in one probe run; "random init" and "pixels" copy the student's shape. Every image is seen whole (no centre
    crop): a digit may sit at the canvas's edge."""
    keys = ["pixels", "random"] + [key for key in ("pixel_mim", "teacher", "student") if key in folders]
    paths = {"pixels": "pixels", "random": "random-init", **folders}
    model_args = run_linear_probe.ModelArguments(
        model_name_or_path=[paths[key] for key in keys],
        model_names=[ROW_NAMES[key] for key in keys],
        random_init_config=folders["student"],
    )
    data_args = run_linear_probe.DataArguments(dataset_name=args.dataset_name, crop_pct=1.0)
    eval_args = run_linear_probe.EvaluationArguments(output_dir=evaluation_dir, plot=True)
    report = run_linear_probe.run_linear_probe(model_args, data_args, eval_args)
    report["row_keys"] = keys
    return report


def loss_summary(name: str, log_history: list[dict], keys: tuple[str, ...]) -> str:
    first, last = log_history[0], log_history[-1]
    lines = [f"{name}: {last['step']} steps, {last['images_per_second']:.0f} images/s at the end"]
    for key in keys:
        if key in first:
            lines.append(
                f"  {key:<11} {first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})"
            )
    return "\n".join(lines)


def _compare(name: str, student: dict, other: dict, tolerance: float = 0.0) -> str:
    """One line: the student's linear-probe and kNN gaps to `other`, and whether each meets `gap >= -tolerance`."""
    verdicts = []
    for metric in ("linear", "knn"):
        gap = student[metric] - other[metric]
        verdicts.append(
            f"{gap:+.1f} {'linear' if metric == 'linear' else 'kNN'} ({'met' if gap >= -tolerance else 'missed'})"
        )
    return f"- student vs {name}: " + ", ".join(verdicts)


def reading(models: list[dict], keys: list[str]) -> list[str]:
    """What the table shows, against the demo's aims, in their order: the student's linear probe and kNN above the
    raw pixels, above pixel MIM, and within 1 point of the teacher or above it. Each line is computed from the
    numbers (`models`, the probe's rows, in the order of the row `keys`) and says plainly when an aim is missed."""
    rows = {
        key: {"linear": 100 * row["linear_probe_top1"], "knn": 100 * row["knn_top1"]} for key, row in zip(keys, models)
    }
    student = rows.get("student")
    lines = []
    if student is not None:
        lines.append("Aims (the student's linear probe and kNN; 'met' or 'missed'):")
        lines.append(_compare("raw pixels, aim: above", student, rows["pixels"]))
        if "pixel_mim" in rows:
            lines.append(_compare("pixel MIM, aim: above", student, rows["pixel_mim"]))
        if "teacher" in rows:
            lines.append(_compare("teacher, aim: at most 1 point below", student, rows["teacher"], tolerance=1.0))
    for metric, name in (("linear", "linear probe"), ("knn", "kNN")):
        best_model = max((row[metric] for key, row in rows.items() if key != "pixels"), default=0.0)
        if rows["pixels"][metric] > best_model:
            lines.append(
                f"- the raw pixels' {name} ({rows['pixels'][metric]:.1f}) beats every model: "
                + (
                    "a pixel vector is a poor input for a linear classifier when the object moves, but its nearest "
                    "neighbours still find the same digit at about the same place; these few hundred steps of a "
                    "64-wide ViT learn nothing that good"
                    if metric == "knn"
                    else "on this data the pixels are nearly separable as they are, and these few hundred steps "
                    "learn nothing better"
                )
            )
    for key in ("teacher", "student", "pixel_mim"):
        if key in rows:
            gain = rows[key]["linear"] - rows["random"]["linear"]
            lines.append(f"- {ROW_NAMES[key]}: {gain:+.1f} linear-probe points over the same network untrained")
    num_test = models[0]["num_test_images"]
    lines.append(
        f"- one seed; on {num_test} test images one image is {100 / num_test:.2f} points, and another seed or CPU model "
        "trains other weights, so gaps of a few points may not hold in another run (docs/benchmarks.md has the "
        "variants that were tried)"
    )
    return lines


def print_report(summaries: list[str], report: dict, folders: dict[str, str]) -> None:
    print()
    for summary in summaries:
        print(summary)
    print()
    first = report["models"][0]
    print(
        f"Frozen CLS features on {report.get('dataset', 'the data')} ({first['num_train_images']} train / "
        f"{first['num_test_images']} test images, {report['num_classes']} classes; chance "
        f"{100 / report['num_classes']:.0f}%):"
    )
    print(results_table(report["models"], knn_k=report["knn"]["k"], knn_temperature=report["knn"]["temperature"]))
    print()
    print("How to read it:")
    print("\n".join(reading(report["models"], report["row_keys"])))
    print()
    print(f"Teacher:   {folders['teacher']}  (MimCoModel; resumable checkpoints in {folders['teacher']}/checkpoints)")
    print(
        f"Student:   {folders['student']}  (MimCoForPreTraining; loads as MimCoModel or MimCoForImageClassification)"
    )
    if "pixel_mim" in folders:
        print(f"Pixel MIM: {folders['pixel_mim']}  (transformers' ViTForMaskedImageModeling)")
    print(f"Results:   {report['results_file']}")
    print(f"t-SNE:     {report['plot_file']}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # no page faults for the memory each step frees and takes again (training/host_memory.py)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    folders = {key: os.path.join(args.output_dir, key) for key in ("teacher", "student", "pixel_mim")}
    if args.skip_pixel_mim:
        del folders["pixel_mim"]

    summaries = []
    if not args.skip_pretraining:
        stage1 = train_teacher(args, folders["teacher"])
        summaries.append(loss_summary("Stage 1 (MoCo v3 teacher)", stage1.log_history, ("loss",)))
        stage2 = train_student(args, folders["teacher"], folders["student"])
        summaries.append(
            loss_summary("Stage 2 (MimCo student)", stage2.log_history, ("loss", "patch_loss", "image_loss"))
        )
        if "pixel_mim" in folders:
            baseline = train_pixel_mim(args, folders["teacher"], folders["pixel_mim"])
            summaries.append(loss_summary("Pixel MIM (SimMIM, the student's steps)", baseline.log_history, ("loss",)))
    report = evaluate(args, folders, os.path.join(args.output_dir, "evaluation"))
    print_report(summaries, report, folders)
    return report


def cli() -> int:
    """The console entry point: `main` on the process's arguments, an expected error as one `error:` line."""
    return run_command(reports_errors(main))
