"""`make teachers`: the stage-1 teachers that the repository ships, trained until their linear probe stops rising.

    python scripts/train_teachers.py                                    # both teachers, the digits' first
    python scripts/train_teachers.py --teachers canvas-digits --max_minutes 30
    python scripts/train_teachers.py --help                             # every flag

Each teacher is a MoCo v3 model trained by the package's own stage 1 (`run_contrastive_pretraining`), in segments of
`--probe_every` steps: after each segment the exported (momentum) encoder is measured with `mimco-probe`'s functions
(`run_linear_probe.measure_models`: a linear probe and a weighted k-NN on the frozen CLS features), and training
stops when the linear probe has stopped rising (no probe among the last `--patience` beats the best before them by
more than `--min_gain` points), at `--max_steps`, or when the next two segments would overrun `--max_minutes`. Each
segment resumes the previous one's checkpoint (`--resume_from_checkpoint latest`), on a schedule that does not depend
on where the run stops: a constant learning rate after a fixed warm-up and a constant EMA momentum
(`--momentum_final` equal to `--momentum`). Then one more segment, the cool-down, takes the learning rate from that
constant down to 0 on a cosine, as a schedule planned for that many steps would end (`--no_cooldown`: none), and is
probed too. The shipped teacher is the probe with the best linear probe (the cool-down's, as a rule). Stopped and
started again, the program goes on from the last probe.

The teachers (`RECIPES`):
- `canvas-digits`: the demo's teacher (`experiments/demo.py`'s stage-1 settings: the 4-layer, 64-wide `tiny`
  ViT on the 32-px digits on plain canvases, batch 64, base learning rate 5e-3, crops of at least 60 %, no flip).
  `make demo` starts its student from it (`--train_teacher`: a teacher of the demo's own budget instead).
- `cifar10`: the reproduction's teacher shape and recipe (`experiments/reproduction_arguments.py` and
  `reproduction_pretraining.py`: `tiny`, CIFAR-10, batch 128, base learning rate 1.5e-3, crops of at least 25 %,
  flips, weight decay 0.1), probed on 10,000 training and 5,000 test images.

What each run writes:
- `OUTPUT_DIR/<name>/`: the stage-1 run (checkpoints, the last export), `best/` (the export with the best linear
  probe so far), `curve.json` (settings, seeds, every probe) and `curve.png`;
- `CARDS_DIR/<name>/` (default `model_cards/teachers/<name>/`): the shipped teacher, the best probe's `MimCoModel`
  folder (a few MB, loads with `MimCoModel.from_pretrained`), its model card `README.md`, `curve.json` and
  `curve.png`.

`model_cards/` lies in the repository, not in the package: a wheel installs no teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch

from modeling_mimco.commands import reports_errors, run_command, run_contrastive_pretraining, run_linear_probe
from modeling_mimco.data.digits import CANVAS_DIGITS_DATASET
from modeling_mimco.data.sources import DataArguments, load_labelled_splits
from modeling_mimco.training.host_memory import keep_freed_memory


CIFAR10 = "cifar10"
HUB_CIFAR10 = "uoft-cs/cifar10"
DEFAULT_CARDS_DIR = os.path.join("model_cards", "teachers")
CURVE_NAME, PLOT_NAME, BEST_NAME = "curve.json", "curve.png", "best"
REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout's root, where `DEFAULT_CARDS_DIR` lies (a wheel installs no shipped teacher)."""
# the files of an exported teacher that the shipped folder keeps (not the run's checkpoints, logs or stage-1 model)
TEACHER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def shipped_teacher_folder(name: str) -> str:
    """Where the checkout keeps the shipped teacher `name` (a recipe's name, e.g. "canvas-digits"); it may not exist."""
    return os.path.join(REPOSITORY_ROOT, DEFAULT_CARDS_DIR, name)


def shipped_teacher_summary(folder: str) -> str:
    """What `make teachers` recorded of a shipped teacher (its `curve.json`): steps and probe, or `""`."""
    path = os.path.join(folder, CURVE_NAME)
    if not os.path.isfile(path):
        return ""
    with open(path) as handle:
        best = json.load(handle).get(BEST_NAME) or {}
    if "step" not in best:
        return ""
    return f"{best['step']:,} stage-1 steps; its probe: {best['linear']:.1f} % linear, {best['knn']:.1f} % kNN"


def choose_teacher_folder(
    label: str,
    given: str | None,
    train_teacher: bool,
    shipped_name: str,
    unfit: Callable[[dict], str],
    trained_here: str,
    trained_instead: str,
) -> tuple[str | None, str]:
    """The stage-1 teacher a study starts from and a line, headed `label`, that says which and why.

    `given` (a `--teacher_name_or_path`) wins; `train_teacher` (`--train_teacher`) asks for none (`None`: the caller
    trains one, as `trained_here` says); otherwise the shipped teacher `shipped_name`, as a user starts stage 2 from
    published MoCo v3 weights, where the checkout has it and `unfit(its config.json)` finds nothing against it
    (`unfit` returns why it does not fit, or `""`). `trained_instead` ends the line: what `--train_teacher` would do.
    """
    if given is not None:
        return given, f"{label}: the given teacher {given} (not trained here)."
    if train_teacher:
        return None, f"{label}: {trained_here} (--train_teacher)."
    shipped = shipped_teacher_folder(shipped_name)
    config_path = os.path.join(shipped, "config.json")
    if not os.path.isfile(config_path):
        return None, f"{label}: no shipped teacher at {shipped} (a wheel installs none), so {trained_here}."
    with open(config_path) as handle:
        reason = unfit(json.load(handle))
    if reason:
        return None, f"{label}: the shipped teacher {reason}, so {trained_here}."
    summary = shipped_teacher_summary(shipped)
    if not os.path.relpath(shipped).startswith(os.pardir):
        shipped = os.path.relpath(shipped)  # recorded as the user sees it from here
    return shipped, (
        f"{label}: the shipped teacher {os.path.join(DEFAULT_CARDS_DIR, shipped_name)}"
        + (f" ({summary})" if summary else "")
        + f", not trained here, as a user starts from published MoCo v3 weights; --train_teacher {trained_instead}."
    )


@dataclass(frozen=True)
class TeacherRecipe:
    """One shipped teacher: its data, its stage-1 settings and its probing."""

    name: str
    description: str
    dataset_name: str | None  # None: `--cifar10` (the local CIFAR-10 copy or the Hub's)
    seed: int
    model_preset: str = "tiny"
    image_size: int | None = None
    batch_size: int = 64
    learning_rate: float = 5e-3
    weight_decay: float = 0.1
    crop_min_scale: float = 0.6
    horizontal_flip: bool = False
    temperature: float = 0.2
    momentum: float = 0.99
    projector_hidden_size: int = 512
    projection_size: int = 128
    warmup_steps: int = 100
    probe_every: int = 400
    max_steps: int = 20000
    probe_train_samples: int | None = None
    probe_eval_samples: int | None = None


RECIPES = {
    CANVAS_DIGITS_DATASET: TeacherRecipe(
        name=CANVAS_DIGITS_DATASET,
        description="the demo's stage-1 teacher: `make demo`'s shape, data and stage-1 settings",
        dataset_name=CANVAS_DIGITS_DATASET,
        seed=42,
        image_size=32,
        weight_decay=0.1,
    ),
    CIFAR10: TeacherRecipe(
        name=CIFAR10,
        description="the CIFAR-10 reproduction's teacher shape and stage-1 settings",
        dataset_name=None,
        seed=0,
        batch_size=128,
        learning_rate=1.5e-3,
        crop_min_scale=0.25,
        horizontal_flip=True,
        warmup_steps=200,
        probe_every=400,
        probe_train_samples=10000,
        probe_eval_samples=5000,
    ),
}


# what a card says of its teacher's data, beside the recipe
CARD_NOTES = {
    CANVAS_DIGITS_DATASET: "Data: `canvas-digits` (`data/digits.py`), the 32-px digits on plain canvases of "
    "`make demo`.",
    CIFAR10: "Data: CIFAR-10 (`uoft-cs/cifar10` layout), the 32-px `tiny` ViT of `make reproduce`.",
}


def parse_args(argv: list[str] | None = None, local_cifar10: str | None = None) -> argparse.Namespace:
    """The command line; `local_cifar10` is a local CIFAR-10 copy (Hub layout) used for `cifar10` where it exists."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--output_dir", default=os.path.join("outputs", "teachers"), help="The runs.")
    parser.add_argument("--cards_dir", default=DEFAULT_CARDS_DIR, help="Where the shipped teachers go.")
    parser.add_argument("--probe_every", type=int, default=None, help="Steps between probes (recipe's default).")
    parser.add_argument("--max_steps", type=int, default=None, help="Most steps of a teacher (recipe's default).")
    parser.add_argument(
        "--max_minutes",
        type=float,
        default=None,
        help="Wall-time budget of each teacher: no segment starts unless it and the cool-down would end within it "
        "(each estimated from the last segment).",
    )
    parser.add_argument("--min_gain", type=float, default=0.5, help="Linear-probe points that count as a rise.")
    parser.add_argument(
        "--no_cooldown",
        dest="cooldown",
        action="store_false",
        help="Stop at the plateau; by default one more segment then takes the learning rate down to 0 on a cosine.",
    )
    parser.add_argument("--patience", type=int, default=2, help="Probes without such a rise before stopping.")
    parser.add_argument("--seed", type=int, default=None, help="Stage-1 seed (recipe's: 42 digits, 0 CIFAR-10).")
    parser.add_argument("--cifar10", default=None, help="CIFAR-10 source (default: the local copy, else the Hub's).")
    parser.add_argument("--dataset_name", default=None, help="Train and probe every teacher on this data (tests).")
    parser.add_argument("--batch_size", type=int, default=None, help="Stage-1 batch (recipe's default).")
    parser.add_argument("--probe_train_samples", type=int, default=None)
    parser.add_argument("--probe_eval_samples", type=int, default=None)
    parser.add_argument("--probe_epochs", type=int, default=100, help="Linear-probe epochs (mimco-probe's 100).")
    parser.add_argument(
        "--ship_only",
        action="store_true",
        help="Train nothing: write each teacher's shipped folder again from its run's best probe and curve.",
    )
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--dataloader_num_workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cifar10 is None:
        local = local_cifar10 if local_cifar10 and os.path.isdir(local_cifar10) else None
        args.cifar10 = os.path.relpath(local) if local else HUB_CIFAR10
    for flag in ("probe_every", "max_steps", "patience", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    return args


def recipe_of(name: str, args: argparse.Namespace) -> TeacherRecipe:
    """The recipe `name` with the command line's overrides."""
    recipe = RECIPES[name]
    overrides = {
        key: getattr(args, key)
        for key in ("probe_every", "max_steps", "seed", "batch_size", "probe_train_samples", "probe_eval_samples")
        if getattr(args, key) is not None
    }
    if args.dataset_name is not None:
        overrides["dataset_name"] = args.dataset_name
    elif recipe.dataset_name is None:
        overrides["dataset_name"] = args.cifar10
    return replace(recipe, **overrides)


def stage1_arguments(
    recipe: TeacherRecipe, run_dir: str, steps: int, args: argparse.Namespace, cooldown_from: int | None = None
) -> tuple:
    """`run_contrastive_pretraining`'s arguments for the first `steps` steps of `recipe` (resuming the last
    checkpoint in `run_dir`): constant learning rate after the warm-up, constant momentum, a checkpoint at every
    probe, so that a run extended segment by segment trains as one run of that many steps would."""
    model_args = run_contrastive_pretraining.ModelArguments(
        model_preset=recipe.model_preset,
        image_size=recipe.image_size,
        projector_hidden_size=recipe.projector_hidden_size,
        projection_size=recipe.projection_size,
        temperature=recipe.temperature,
        momentum=recipe.momentum,
        momentum_final=recipe.momentum,
        crop_min_scale=recipe.crop_min_scale,
        horizontal_flip=recipe.horizontal_flip,
    )
    training_args = run_contrastive_pretraining.ContrastivePreTrainingArguments(
        output_dir=run_dir,
        seed=recipe.seed,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        # the cool-down: transformers' cosine schedule whose "warm-up" ends where the cool-down starts, so that the
        # resumed run goes from the constant rate down to 0 at `steps`
        lr_scheduler_type="constant_with_warmup" if cooldown_from is None else "cosine",
        num_warmup_steps=min(recipe.warmup_steps, steps) if cooldown_from is None else cooldown_from,
        max_train_steps=steps,
        logging_steps=max(min(100, recipe.probe_every // 2), 1),
        checkpointing_steps=recipe.probe_every,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        report_to="none",
        mixed_precision="no",
        dataloader_num_workers=args.dataloader_num_workers,
    )
    return model_args, DataArguments(dataset_name=recipe.dataset_name), training_args


def probe_arguments(recipe: TeacherRecipe, folder: str, run_dir: str, args: argparse.Namespace) -> tuple:
    """`run_linear_probe`'s arguments for one export: CLS features of every image seen whole (the demo's protocol)."""
    model_args = run_linear_probe.ModelArguments(model_name_or_path=[folder], model_names=[f"teacher {recipe.name}"])
    data_args = run_linear_probe.DataArguments(
        dataset_name=recipe.dataset_name,
        crop_pct=1.0,
        max_train_samples=recipe.probe_train_samples,
        max_eval_samples=recipe.probe_eval_samples,
    )
    eval_args = run_linear_probe.EvaluationArguments(
        output_dir=os.path.join(run_dir, "probe"), device="cpu", probe_epochs=args.probe_epochs
    )
    return model_args, data_args, eval_args


def should_stop(curve: list[dict], min_gain: float, patience: int) -> bool:
    """Whether the linear probe has stopped rising: none of the last `patience` probes beats the best of the earlier
    ones by more than `min_gain` points."""
    if len(curve) <= patience:
        return False
    before = max(point["linear"] for point in curve[:-patience])
    return max(point["linear"] for point in curve[-patience:]) <= before + min_gain


def copy_teacher(source: str, destination: str) -> None:
    """The exported `MimCoModel` of `source` (config, weights, image processor, the model files it carries) into a
    fresh `destination`."""
    if os.path.isdir(destination):
        shutil.rmtree(destination)
    os.makedirs(destination)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and (name in TEACHER_FILES or name.endswith(".py")):
            shutil.copy2(path, os.path.join(destination, name))
            os.chmod(os.path.join(destination, name), 0o644)  # the final save writes its weights owner-only


def write_json(path: str, content: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(content, handle, indent=2)
    os.replace(temporary, path)


def plot_curve(state: dict, path: str) -> str:
    """The probe curve (linear probe and kNN against steps), the shipped probe marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [point["step"] for point in state["curve"]]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.plot(steps, [point["linear"] for point in state["curve"]], "o-", label="linear probe")
    axes.plot(steps, [point["knn"] for point in state["curve"]], "s-", label="weighted kNN")
    cooled = [point for point in state["curve"] if "cooldown_from" in point]
    if cooled:
        axes.axvspan(cooled[0]["cooldown_from"], cooled[0]["step"], color="tab:blue", alpha=0.08, label="cool-down")
    best = state.get("best")
    if best:
        axes.axvline(best["step"], color="grey", linestyle=":", label=f"shipped (step {best['step']})")
    axes.set_xlabel("stage-1 steps")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(f"teacher {state['name']}: frozen CLS features")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log(message: str) -> None:
    print(f"[teachers {datetime.now(timezone.utc):%H:%M:%S}] {message}", flush=True)


def start_state(recipe: TeacherRecipe, args: argparse.Namespace, run_dir: str, curve_path: str) -> dict:
    """A teacher's fresh state (`curve.json`), or the one its earlier run left in `run_dir` to go on from; refuses a
    curve that another recipe wrote."""
    state = {
        "name": recipe.name,
        "recipe": asdict(recipe),
        "stopping": {
            "min_gain": args.min_gain,
            "patience": args.patience,
            "max_minutes": args.max_minutes,
            "cooldown": args.cooldown,
        },
        "probe": {"epochs": args.probe_epochs, "pooling": "cls", "crop_pct": 1.0, "knn": {"k": 20, "t": 0.07}},
        "curve": [],
        "stopped_because": None,
    }
    if os.path.isfile(curve_path):
        with open(curve_path) as handle:
            saved = json.load(handle)
        if {**saved.get("recipe", {}), "max_steps": recipe.max_steps} != state["recipe"]:  # a longer run is fine
            raise ValueError(
                f"{curve_path} was written by another recipe; start in another --output_dir or remove {run_dir}."
            )
        state["curve"], state["best"] = saved["curve"], saved.get("best")
        log(f"{recipe.name}: going on from step {state['curve'][-1]['step'] if state['curve'] else 0}")
    return state


def train_and_probe(
    recipe: TeacherRecipe,
    args: argparse.Namespace,
    state: dict,
    probe: tuple,
    target: int,
    cooldown_from: int | None = None,
) -> float:
    """One segment up to step `target` (a cool-down from `cooldown_from`), its probe (`probe`: the probe's model,
    data and evaluation arguments and its loaded splits), the curve and the shipped folder brought up to date;
    returns the segment's seconds."""
    run_dir = os.path.join(args.output_dir, recipe.name)
    model_args, data_args, eval_args, data = probe
    segment_start = time.monotonic()
    stage1 = stage1_arguments(recipe, run_dir, target, args, cooldown_from)
    run_contrastive_pretraining.run_contrastive_pretraining(*stage1)
    train_seconds = time.monotonic() - segment_start
    (result,) = run_linear_probe.measure_models(model_args, data_args, eval_args, data)
    seconds = time.monotonic() - segment_start
    point = {
        "step": target,
        "linear": round(100 * result.linear_probe_top1, 2),
        "knn": round(100 * result.knn_top1, 2),
        "train_seconds": round(train_seconds, 1),
        "probe_seconds": round(seconds - train_seconds, 1),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if cooldown_from is not None:
        point["cooldown_from"] = cooldown_from
    state["curve"].append(point)
    if not state.get("best") or point["linear"] > state["best"]["linear"]:
        copy_teacher(run_dir, os.path.join(run_dir, BEST_NAME))
        state["best"] = point
    log(f"{recipe.name}: step {target}: linear {point['linear']:.1f}, kNN {point['knn']:.1f}")
    write_json(os.path.join(run_dir, CURVE_NAME), state)
    plot_curve(state, os.path.join(run_dir, PLOT_NAME))
    ship_teacher(state, args)  # after every probe, so that a run stopped early still leaves its best teacher
    return seconds


def stop_reason(
    state: dict, recipe: TeacherRecipe, args: argparse.Namespace, budget_left: float | None, segment_seconds
) -> str | None:
    """Why the teacher stops before its next segment (the probe stopped rising, `--max_steps`, or the next segment
    would overrun `--max_minutes`), or `None` to go on."""
    step = state["curve"][-1]["step"] if state["curve"] else 0
    if should_stop(state["curve"], args.min_gain, args.patience):
        return f"no linear-probe gain above {args.min_gain} points in the last {args.patience} probes"
    if step >= recipe.max_steps:
        return f"reached --max_steps {recipe.max_steps}"
    if budget_left is not None and segment_seconds and budget_left < (2 if args.cooldown else 1) * segment_seconds:
        return f"the next segment would overrun --max_minutes {args.max_minutes:g}"
    return None


def train_teacher(recipe: TeacherRecipe, args: argparse.Namespace) -> dict:
    """Trains, probes and stops one teacher (see the module's docstring); returns its state (`curve.json`)."""
    run_dir = os.path.join(args.output_dir, recipe.name)
    os.makedirs(run_dir, exist_ok=True)
    curve_path = os.path.join(run_dir, CURVE_NAME)
    state = start_state(recipe, args, run_dir, curve_path)
    model_args, data_args, eval_args = probe_arguments(recipe, run_dir, run_dir, args)
    data = load_labelled_splits(data_args, eval_args.seed)
    probe = (model_args, data_args, eval_args, data)
    state["num_train_images"], state["num_test_images"] = len(data.train), len(data.eval)
    started, segment_seconds = time.monotonic(), None

    cooled = bool(state["curve"]) and "cooldown_from" in state["curve"][-1]
    while not cooled:
        step = state["curve"][-1]["step"] if state["curve"] else 0
        budget_left = None if args.max_minutes is None else 60 * args.max_minutes - (time.monotonic() - started)
        state["stopped_because"] = stop_reason(state, recipe, args, budget_left, segment_seconds)
        if state["stopped_because"]:
            break
        target = min(step + recipe.probe_every, recipe.max_steps)
        log(f"{recipe.name}: stage 1 from step {step} to {target}")
        segment_seconds = train_and_probe(recipe, args, state, probe, target)
    if args.cooldown and not cooled and state["curve"]:
        # the learning rate from its constant value down to 0 on a cosine over one more segment, as a run of this
        # length would end
        step = state["curve"][-1]["step"]
        log(f"{recipe.name}: cool-down from step {step} to {step + recipe.probe_every}")
        train_and_probe(recipe, args, state, probe, step + recipe.probe_every, cooldown_from=step)
    write_json(curve_path, state)
    plot_curve(state, os.path.join(run_dir, PLOT_NAME))
    log(f"{recipe.name}: stopped at step {state['curve'][-1]['step']}: {state['stopped_because']}")
    return state


def card_text(state: dict, folder: str) -> str:
    """The shipped teacher's model card: `hub.model_card.build_model_card`'s card with the probe curve added."""
    from modeling_mimco.hub.model_card import build_model_card

    recipe, best = state["recipe"], state["best"]
    dataset = HUB_CIFAR10 if state["name"] == CIFAR10 else recipe["dataset_name"]  # not the local copy's path
    results = {
        "model_name": f"mimco-teacher-{state['name']}",
        "dataset": {"id": dataset, "name": dataset, "split": "test"},
        "results": {"linear_probe_top1": best["linear"], "knn_top1": best["knn"]},
        "pretraining": {
            "stage": "1 (MoCo v3 teacher, `mimco-contrastive`)",
            "dataset": dataset,
            "steps": best["step"],
            "batch size": recipe["batch_size"],
            "seed": recipe["seed"],
        },
    }
    card = str(build_model_card(folder, results, repo_id=f"mimco-teacher-{state['name']}"))
    rows = "\n".join(
        f"| {p['step']}{' (cool-down)' if 'cooldown_from' in p else ''} | {p['linear']:.1f} | {p['knn']:.1f} |"
        for p in state["curve"]
    )
    settings = ", ".join(f"{key} {value}" for key, value in recipe.items() if key not in ("name", "description"))
    return (
        card.rstrip()
        + f"""

## How this teacher was trained (`make teachers`)

{recipe["description"][0].upper() + recipe["description"][1:]}, trained by `scripts/train_teachers.py` (`modeling_mimco/experiments/teachers.py`) with the
package's stage 1 in segments of {recipe["probe_every"]} steps at a constant learning rate and momentum, then one
segment taking the learning rate down to 0 on a cosine (the cool-down: the last row below, if there), probed after
each (linear probe and weighted kNN, k=20, T=0.07, on the frozen CLS features of {state.get("num_train_images")}
training and {state.get("num_test_images")} test images). Stopped: {state["stopped_because"] or "not yet (still training)"}. This folder is the
probe with the best linear probe (step {best["step"]}). Settings: {settings}.

{CARD_NOTES.get(state["name"], "")}

| step | linear probe top-1 (%) | kNN top-1 (%) |
|---:|---:|---:|
{rows}

![probe curve](curve.png)
"""
    )


def ship_teacher(state: dict, args: argparse.Namespace) -> str:
    """Copies the best probe's teacher, its curve and its card to `CARDS_DIR/<name>/`; returns the folder."""
    run_dir = os.path.join(args.output_dir, state["name"])
    folder = os.path.join(args.cards_dir, state["name"])
    copy_teacher(os.path.join(run_dir, BEST_NAME), folder)
    for name in (CURVE_NAME, PLOT_NAME):
        shutil.copy2(os.path.join(run_dir, name), os.path.join(folder, name))
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write(card_text(state, folder))
    return folder


def main(argv: list[str] | None = None, local_cifar10: str | None = None) -> dict:
    args = parse_args(argv, local_cifar10)
    keep_freed_memory()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    shipped = {}
    for name in args.teachers:
        if args.ship_only:
            with open(os.path.join(args.output_dir, name, CURVE_NAME)) as handle:
                state = json.load(handle)
        else:
            state = train_teacher(recipe_of(name, args), args)
        folder = ship_teacher(state, args)
        best = state["best"]
        log(f"{name}: shipped {folder} (step {best['step']}: linear {best['linear']:.1f}, kNN {best['knn']:.1f})")
        shipped[name] = state
    return shipped


def cli(local_cifar10: str | None = None) -> int:
    """The console entry point: `main` on the process's arguments, an expected error as one `error:` line."""
    return run_command(reports_errors(lambda argv: main(argv, local_cifar10)))
