"""`make demo`: a MimCo student from the shipped stage-1 teacher and the pixel-MIM baseline on built-in digits, then a
frozen-feature evaluation; CPU, no network.

Data (`--dataset_name canvas-digits`, `data/digits.py`): each of scikit-learn's 8x8 digits at a random position and
scale (45-75 % of a 32-px canvas) on a plain dark canvas with pixel noise; 6,108 training and 540 test images (test
handwriting unseen). A linear classifier on the raw pixels is near chance there, and only the digit tells one image
from another. (`--dataset_name cluttered-digits` puts the digits among clutter, the demo's data until its teacher was
shipped; `--dataset_name digits` gives the earlier demo's centred digits, on which the raw pixels beat every model.)

The teacher: by default the shipped one, `model_cards/teachers/canvas-digits` (`make teachers` trained it with the
demo's stage-1 settings until its linear probe stopped rising), as a user starts stage 2 from published MoCo v3
weights; it is evaluated, not trained. `--train_teacher` trains a teacher of the demo's budget (`--stage1_steps`)
instead, and so does a run on other data or another image size, or from a wheel (which installs no teacher).

Two processes share the work, so that both cores of a small machine are busy (`experiments/background.py`):
1. The first trains the teacher where it has to (stage 1, a tiny MoCo v3), then stage 2, a MimCo student against it.
2. Meanwhile the second (at a lower priority, its output in `OUTPUT_DIR/baselines.log`) trains pixel MIM (SimMIM,
   transformers' `ViTForMaskedImageModeling`, `experiments/pixel_mim.py`) with the student's shape, data, masks, steps
   and schedule: the method the paper compares MimCo with. Then it measures the rows that need neither teacher nor
   student: the normalised pixels (the baseline that learned features must beat), an untrained model of the
   student's shape (its config is written to `OUTPUT_DIR/random_init` first) and pixel MIM.
3. The first process measures the teacher and the student the same way, then writes one report of all five rows
   (`run_linear_probe.report_results`): linear probe and weighted k-NN on the CLS features, and a t-SNE picture of
   the test features.
`--sequential` does the same work in one process, one step after the other, and gets the same weights and the same
table (tests/test_demo.py checks this).

The script prints how the losses moved, a table of the accuracies, a reading of the table against the demo's aims
(the student above the pixels, above pixel MIM, and within a point of the teacher or above it, on both metrics), and
where the checkpoints and the picture are. In each process one torch thread trains while a loader worker prepares the
next batch, and freed tensors are kept for the next step (`host_memory.keep_freed_memory`); docs/history.md has
the wall times and every variant of the data, the teacher and the step counts that was tried, with its table.

Settings that differ from the paper-scale defaults, for a 4-layer, 64-wide ViT on 32-px images, chosen by measurement
(docs/history.md):
- 400 stage-2 (and pixel-MIM) steps of batch 64, and 200 stage-1 steps for a teacher trained here. From the shipped
  teacher, 1,200 student steps did no better than 400 (docs/history.md, "The demo from a shipped teacher");
- no horizontal flip in either stage (a mirrored 2, 3, 5 or 7 is no digit) and crops of at least 60 % (stage 1) and
  67 % (stage 2) of the image; MoCo v3's 8 % crops leave a stroke;
- base learning rates 5e-3 (stage 1) and 1.5e-3 (stage 2);
- an image-level temperature of 0.01 instead of 0.2: a 200-step teacher's CLS features all point almost the same
  way, so at 0.2 the image-level InfoNCE logits hardly differ between images and that loss stays at its chance value,
  ln(batch size); from the shipped teacher 0.2 did no better.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from modeling_mimco.commands import (
    reports_errors,
    run_command,
    run_contrastive_pretraining,
    run_linear_probe,
    run_pretraining,
)
from modeling_mimco.data.digits import CANVAS_DIGITS_DATASET
from modeling_mimco.data.sources import DataArguments, load_labelled_splits
from modeling_mimco.evaluation.frozen_features import FrozenFeatureResult, results_table
from modeling_mimco.experiments.background import BackgroundRun
from modeling_mimco.experiments.pixel_mim import run_pixel_mim
from modeling_mimco.experiments.teachers import DEFAULT_CARDS_DIR, choose_teacher_folder
from modeling_mimco.training.host_memory import keep_freed_memory
from modeling_mimco.training.loop import TrainingResult


SHIPPED_TEACHER_RELATIVE = os.path.join(DEFAULT_CARDS_DIR, CANVAS_DIGITS_DATASET)
"""The demo's shipped teacher (`make teachers`), relative to the repository root; a wheel installs none."""


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the teacher comes from: the shipped one (default), a given folder, or trained here."""
    parser.add_argument(
        "--teacher_name_or_path",
        default=None,
        help="The stage-1 teacher the student starts from (a MimCoModel folder). Default: the shipped teacher of the "
        f"demo's data ({SHIPPED_TEACHER_RELATIVE}, trained by `make teachers`) when it exists and fits the images.",
    )
    parser.add_argument(
        "--train_teacher",
        action="store_true",
        help="Train a teacher for --stage1_steps instead of starting from the shipped one.",
    )
    parser.add_argument("--stage1_steps", type=int, default=200, help="Steps of a teacher the demo trains itself.")


def check_teacher_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.train_teacher and args.teacher_name_or_path is not None:
        parser.error("--train_teacher and --teacher_name_or_path exclude each other: train a teacher, or give one.")
    if args.teacher_name_or_path is not None and not os.path.isfile(
        os.path.join(args.teacher_name_or_path, "config.json")
    ):
        parser.error(f"--teacher_name_or_path {args.teacher_name_or_path}: no config.json there (not a model folder).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument(
        "--dataset_name",
        default=CANVAS_DIGITS_DATASET,
        help="The built-in data: 'canvas-digits' (digits at random places and scales on plain canvases), "
        "'cluttered-digits' (the same among clutter) or 'digits' (the 8x8 digits upscaled, on which raw pixels beat "
        "every model), or any source `mimco-pretrain` reads.",
    )
    add_teacher_arguments(parser)
    parser.add_argument(
        "--stage2_steps", type=int, default=400, help="Steps of the MimCo student and of the pixel-MIM baseline."
    )
    parser.add_argument("--skip_pixel_mim", action="store_true", help="Leave the pixel-MIM row out (faster).")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="Train pixel MIM and measure the baseline rows (pixels, random init, pixel MIM) after the student, in "
        "this process, instead of in a second process beside stages 1 and 2 (the same numbers; slower on a machine "
        "with two or more cores).",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="Seed of both stages and of pixel MIM.")
    parser.add_argument("--image_size", type=int, default=32, help="Side of the built-in images.")
    parser.add_argument("--mask_patch_size", type=int, default=None, help="Stage-2 mask block size (preset's).")
    parser.add_argument(
        "--mask_ratio", type=float, default=0.6, help="Fraction of the patches that stage 2 and pixel MIM mask."
    )
    parser.add_argument("--stage1_learning_rate", type=float, default=5e-3)
    parser.add_argument("--stage2_learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--stage1_crop_min_scale", type=float, default=0.6)
    parser.add_argument("--stage2_crop_min_scale", type=float, default=0.67)
    parser.add_argument("--image_temperature", type=float, default=0.01)
    parser.add_argument(
        "--probe_epochs",
        type=int,
        default=100,
        help="Epochs of each row's linear probe over its cached features (mimco-probe's --probe_epochs).",
    )
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
    args = parser.parse_args(argv)
    check_teacher_arguments(parser, args)
    for flag in ("stage1_crop_min_scale", "stage2_crop_min_scale"):  # the stages' own messages name --crop_min_scale
        if not 0.0 < getattr(args, flag) <= 1.0:
            parser.error(f"--{flag} must lie in (0, 1], got {getattr(args, flag)}.")
    return args


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


def choose_teacher(args: argparse.Namespace) -> tuple[str | None, str]:
    """The teacher folder the student starts from (`None`: the demo trains one for `--stage1_steps`), and a line that
    says which and why. By default the shipped teacher, where it exists and was trained on the demo's data and size,
    as a user starts stage 2 from published MoCo v3 weights."""

    def unfit(config: dict) -> str:
        if args.dataset_name == CANVAS_DIGITS_DATASET and args.image_size == config.get("image_size"):
            return ""
        return (
            f"is for {CANVAS_DIGITS_DATASET} at {config.get('image_size')} px, not {args.dataset_name} at "
            f"{args.image_size} px"
        )

    return choose_teacher_folder(
        "Stage 1",
        args.teacher_name_or_path,
        args.train_teacher,
        CANVAS_DIGITS_DATASET,
        unfit,
        trained_here=f"a teacher is trained here for {args.stage1_steps} steps",
        trained_instead=f"trains one for {args.stage1_steps} steps instead",
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
        mask_ratio=args.mask_ratio,
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
    """The pixel-MIM baseline: SimMIM of the student's shape, with the student's data, masks, steps and schedule. It
    reads no teacher (`teacher_dir` only completes the student's arguments), so it can train before the teacher
    exists."""
    return run_pixel_mim(*student_arguments(args, teacher_dir, pixel_mim_dir))


SECOND_PROCESS_LOG = "baselines.log"

ROW_NAMES = {
    "pixels": "raw pixels",
    "random": "random init",
    "pixel_mim": "pixel MIM (SimMIM)",
    "teacher": "teacher (MoCo v3, stage 1)",
    "student": "student (MimCo, stage 2)",
}
MIMCO_ROWS = ("teacher", "student")


def demo_folders(args: argparse.Namespace) -> dict[str, str]:
    """Where each model goes: `teacher`, `student`, `pixel_mim` (unless skipped), and `random_init`, the config of
    the untrained row."""
    keys = ("teacher", "student", "random_init") + (() if args.skip_pixel_mim else ("pixel_mim",))
    return {key: os.path.join(args.output_dir, key) for key in keys}


def baseline_rows(folders: dict[str, str]) -> list[str]:
    """The rows that need neither the teacher nor the student: raw pixels, random init and pixel MIM."""
    return ["pixels", "random"] + (["pixel_mim"] if "pixel_mim" in folders else [])


def write_random_init_config(args: argparse.Namespace, folders: dict[str, str]) -> None:
    """Writes the student's config to `random_init/`, before any stage trains: the random-init row is an untrained
    model of that shape, and can then be measured while the student trains."""
    model_args, _, _ = student_arguments(args, folders["teacher"], folders["student"])
    run_pretraining.build_config(model_args).save_pretrained(folders["random_init"])


def probe_arguments(args: argparse.Namespace, keys: list[str], folders: dict[str, str], evaluation_dir: str) -> tuple:
    """`run_linear_probe`'s arguments for the rows `keys`: CLS features, every image seen whole (no centre crop: a
    digit may sit at the canvas's edge), the t-SNE picture on."""
    paths = {"pixels": "pixels", "random": "random-init", **folders}
    model_args = run_linear_probe.ModelArguments(
        model_name_or_path=[paths[key] for key in keys],
        model_names=[ROW_NAMES[key] for key in keys],
        random_init_config=folders["random_init"],
    )
    data_args = run_linear_probe.DataArguments(dataset_name=args.dataset_name, crop_pct=1.0)
    eval_args = run_linear_probe.EvaluationArguments(
        output_dir=evaluation_dir, plot=True, probe_epochs=args.probe_epochs
    )
    return model_args, data_args, eval_args


def train_and_measure_baselines(
    args: argparse.Namespace, folders: dict[str, str], evaluation_dir: str, train: bool
) -> tuple[TrainingResult | None, list[FrozenFeatureResult]]:
    """Trains pixel MIM (when `train` and the row is not skipped), then measures the baseline rows (`baseline_rows`);
    returns pixel MIM's training result (or `None`) and the rows' results."""
    baseline = (
        train_pixel_mim(args, folders["teacher"], folders["pixel_mim"]) if train and "pixel_mim" in folders else None
    )
    rows = run_linear_probe.measure_models(*probe_arguments(args, baseline_rows(folders), folders, evaluation_dir))
    return baseline, rows


def baselines_in_second_process(
    args: argparse.Namespace, folders: dict[str, str], evaluation_dir: str, train: bool
) -> tuple[TrainingResult | None, list[FrozenFeatureResult]]:
    """`train_and_measure_baselines` as the demo's second process runs it (`BackgroundRun`), with the first process's
    memory and thread settings, so that it computes the same numbers. Its results are needed only once the student
    has trained, so it runs at a lower priority (nice 10) and takes the CPU that stages 1 and 2 leave."""
    os.nice(10)
    keep_freed_memory()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    return train_and_measure_baselines(args, folders, evaluation_dir, train)


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
        "trains other weights, so gaps of a few points may not hold in another run (docs/history.md has the "
        "variants that were tried)"
    )
    return lines


def print_report(summaries: list[str], report: dict, folders: dict[str, str], trained_teacher: bool = True) -> None:
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
    if trained_teacher:
        print(
            f"Teacher:   {folders['teacher']}  (MimCoModel; resumable checkpoints in {folders['teacher']}/checkpoints)"
        )
    else:
        print(f"Teacher:   {folders['teacher']}  (MimCoModel, given; not trained by this run)")
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
    folders = demo_folders(args)
    given_teacher, stage1_line = choose_teacher(args)
    if given_teacher is not None:
        folders["teacher"] = given_teacher
    print(stage1_line)
    evaluation_dir = os.path.join(args.output_dir, "evaluation")
    write_random_init_config(args, folders)

    summaries = []
    with contextlib.ExitStack() as stack:
        second_process = None
        if not args.sequential:
            log_path = os.path.join(args.output_dir, SECOND_PROCESS_LOG)
            second_process = stack.enter_context(
                BackgroundRun(
                    baselines_in_second_process,
                    (args, folders, evaluation_dir, not args.skip_pretraining),
                    log_path=log_path,
                    description="The demo's second process (pixel MIM and the baseline rows)",
                )
            )
            what = "pixel MIM trains and " if "pixel_mim" in folders and not args.skip_pretraining else ""
            print(f"In a second process, {what}the baseline rows are measured; its log: {log_path}")
        if not args.skip_pretraining:
            if given_teacher is None:
                stage1 = train_teacher(args, folders["teacher"])
                summaries.append(loss_summary("Stage 1 (MoCo v3 teacher)", stage1.log_history, ("loss",)))
            else:
                summaries.append(stage1_line)
            stage2 = train_student(args, folders["teacher"], folders["student"])
            summaries.append(
                loss_summary("Stage 2 (MimCo student)", stage2.log_history, ("loss", "patch_loss", "image_loss"))
            )
        # the teacher's and the student's rows, while the second process may still be measuring its own
        model_args, data_args, eval_args = probe_arguments(args, list(MIMCO_ROWS), folders, evaluation_dir)
        data = load_labelled_splits(data_args, eval_args.seed)
        mimco_results = run_linear_probe.measure_models(model_args, data_args, eval_args, data)
        if second_process is not None:
            print("Waiting for the second process ...")
            baseline, baseline_results = second_process.result()
        else:
            baseline, baseline_results = train_and_measure_baselines(
                args, folders, evaluation_dir, not args.skip_pretraining
            )
    if baseline is not None:
        summaries.append(loss_summary("Pixel MIM (SimMIM, the student's steps)", baseline.log_history, ("loss",)))
    report = run_linear_probe.report_results([*baseline_results, *mimco_results], data, data_args, eval_args)
    report["row_keys"] = baseline_rows(folders) + list(MIMCO_ROWS)
    print_report(summaries, report, folders, trained_teacher=given_teacher is None)
    return report


def cli() -> int:
    """The console entry point: `main` on the process's arguments, an expected error as one `error:` line."""
    return run_command(reports_errors(main))
