"""The reproduction's results file and settings: the settings a run is recorded under, the guard that refuses to
resume checkpoints trained under other settings, and the results state a run continues (with its step plan)."""

from __future__ import annotations

import json
import os
import shutil

from modeling_mimco.experiments.reproduction_arguments import (
    COMPUTE_MATCHED_ROW,
    HEAD_HIDDEN_SIZE,
    PROJECTION_SIZE,
    PROJECTOR_HIDDEN_SIZE,
    given_teacher,
    log,
    wanted_rows,
)
from modeling_mimco.experiments.reproduction_budget import compute_matched_steps, plan_steps, time_pretraining_steps


RESULTS_VERSION = 2


def settings_of(args, plan: dict) -> dict:
    from modeling_mimco.configuration_mimco import MODEL_PRESETS

    return {
        "version": RESULTS_VERSION,
        "dataset": args.dataset_name,
        "smoke": args.smoke,
        "budget_minutes": args.budget_minutes,
        "model_preset": args.model_preset,
        "backbone": MODEL_PRESETS.get(args.model_preset),
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "eval_repeats": args.eval_repeats,
        "stage1_crop_min_scale": args.stage1_crop_min_scale,
        "batch_size": args.batch_size,
        "base_learning_rate": args.learning_rate,
        "pretrain_steps": plan["pretrain_steps"],
        "matched_pixel_mim_steps": plan.get("matched_pixel_mim_steps"),
        "shared_teacher": getattr(args, "teacher_dir", None) is not None,
        "given_teacher": given_teacher(args),
        "probe_train_samples": args.probe_train_samples,
        "eval_samples": args.eval_samples,
        "probe_epochs": args.probe_epochs,
        "finetune_samples": args.finetune_samples,
        "finetune_epochs": args.finetune_epochs,
        "finetune_learning_rate": args.finetune_learning_rate,
        "projector_hidden_size": PROJECTOR_HIDDEN_SIZE,
        "projection_size": PROJECTION_SIZE,
        "head_hidden_size": HEAD_HIDDEN_SIZE,
    }


# The settings that the checkpoints under --output_dir depend on; resuming them under others would mix two runs.
PRETRAINING_SETTINGS = (
    "dataset",
    "smoke",
    "model_preset",
    "seed",
    "stage1_crop_min_scale",
    "batch_size",
    "base_learning_rate",
    "pretrain_steps",
    "matched_pixel_mim_steps",
    "given_teacher",
    "projector_hidden_size",
    "projection_size",
    "head_hidden_size",
)


# The settings the shared teacher of `--seeds` depends on (it is trained with the first seed): all but the students'.
TEACHER_SETTINGS = tuple(
    key for key in PRETRAINING_SETTINGS if key not in ("matched_pixel_mim_steps", "head_hidden_size")
)


def check_pretraining_settings(
    output_dir: str, settings: dict, keys: tuple[str, ...] = PRETRAINING_SETTINGS, name: str = "pretraining_settings"
) -> None:
    """Records the pre-training settings in `output_dir`, or refuses to reuse a folder trained under other ones."""
    wanted = {key: settings[key] for key in keys}
    path = os.path.join(output_dir, f"{name}.json")
    stored = load_state(path)
    if stored is not None and stored != wanted:
        changed = sorted(key for key in wanted if stored.get(key) != wanted[key])
        raise SystemExit(
            f"reproduce.py: {output_dir} holds checkpoints pre-trained with other settings ({', '.join(changed)}); "
            "pass another --output_dir or delete that folder."
        )
    write_json(path, wanted)


def load_state(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_json(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(state, handle, indent=2)
    os.replace(temporary, path)


def start_results(args, results_path: str) -> tuple[dict, dict]:
    """The results state to continue (or a fresh one when the settings changed) and the step plan; both written."""
    state = load_state(results_path)
    # the plan: the first seed's (`--seeds`), or a stored one for the same budget, so that a rerun trains the same
    # number of steps
    plan = getattr(args, "plan", None)
    if plan is None and state is not None and state.get("settings", {}).get("budget_minutes") == args.budget_minutes:
        plan = state.get("plan")
        if args.pretrain_steps is not None and (plan or {}).get("pretrain_steps") != args.pretrain_steps:
            plan = None
    if plan is None and args.pretrain_steps is not None:
        plan = {"pretrain_steps": args.pretrain_steps, "source": "--pretrain_steps"}
        if COMPUTE_MATCHED_ROW in wanted_rows(args):
            log("Timing a few pre-training steps of each objective for the compute-matched pixel-MIM row ...")
            seconds = time_pretraining_steps(args)
            plan["measured_seconds_per_step"] = {k: round(v, 4) for k, v in seconds.items()}
            plan["matched_pixel_mim_steps"] = compute_matched_steps(
                args.pretrain_steps, seconds, include_teacher=given_teacher(args) is None
            )
    if plan is None:
        log("Timing a few pre-training steps of each objective to size the run ...")
        plan = plan_steps(args, time_pretraining_steps(args), len(args.seeds or [args.seed]))
        plan["source"] = f"--budget_minutes {args.budget_minutes:g}"
    settings = settings_of(args, plan)
    if state is not None and state.get("settings") != settings:
        backup = results_path + ".previous"
        shutil.copyfile(results_path, backup)
        log(f"{results_path} holds results for other settings; starting afresh (old file kept as {backup}).")
        state = None
    if state is None:
        state = {"settings": settings, "plan": plan, "rows": {}}
    write_json(results_path, state)
    return state, plan
