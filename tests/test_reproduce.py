"""`scripts/reproduce.py` (issue 7): the CIFAR-10 comparison table, run end to end in its `--smoke` mode.

The smoke run needs no network and no CIFAR-10: it uses `../shared/datasets/cifar10` when that folder exists and the
built-in digits data otherwise, so these tests always run. The numbers of a smoke run are noise (a few steps on a
few hundred images) and are not asserted; the shape of the outputs, the skipping of finished rows and the fairness
settings (one step count for every pre-trained row, the pixel-MIM encoder loaded through `evaluation.py`) are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "reproduce.py"
ROW_KEYS = {
    "pixels",
    "random_init",
    "teacher",
    "pixel_mim",
    "pixel_mim_matched",
    "mimco",
    "mimco_patch_only",
    "mimco_image_only",
    "mimco_smooth_l1",
}
METRICS = ("linear_probe_top1_cls", "linear_probe_top1_mean", "knn_top1_cls", "knn_top1_mean", "finetune_top1")


def _run(*flags: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    elapsed = time.perf_counter() - start
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed, elapsed


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `--smoke` run of every row, shared by the tests below."""
    root = tmp_path_factory.mktemp("reproduce")
    flags = ("--smoke", "--output_dir", str(root / "out"), "--results_dir", str(root / "results"))
    completed, elapsed = _run(*flags)
    return root, flags, completed, elapsed


@pytest.mark.slow
def test_smoke_writes_every_row_and_a_well_formed_table(smoke_run):
    root, _, completed, elapsed = smoke_run
    print(f"reproduce.py --smoke took {elapsed:.0f} s")
    state = json.loads((root / "results" / "reproduce_results.json").read_text())
    assert state["settings"]["smoke"] is True
    assert set(state["rows"]) == ROW_KEYS
    untrained = {"pixels", "random_init"}
    for key, row in state["rows"].items():
        for metric in METRICS:
            if key == "pixels" and metric == "finetune_top1":
                assert row[metric] is None  # nothing to fine-tune
                continue
            assert 0.0 <= row[metric] <= 1.0, (key, metric, row[metric])
        assert row["num_test_images"] > 0 and row["num_probe_train_images"] > 0
        # the spread over the evaluation seeds: the table's CLS scores are its first measurement
        assert row["evaluation_seeds"] == [0, 1, 2]
        for metric in ("linear_probe_top1_cls", "knn_top1_cls"):
            measured = row["evaluation_spread"][metric]
            assert len(measured["values"]) == 3 and measured["values"][0] == row[metric]
            assert measured["mean"] == pytest.approx(sum(measured["values"]) / 3)
            assert measured["std"] == pytest.approx(torch.tensor(measured["values"], dtype=torch.float64).std().item())
    # the baseline is the normalised pixels themselves: one feature per pixel and channel
    assert state["rows"]["pixels"]["feature_dim"] == 3 * 32 * 32
    # the same pre-training step count for every pre-trained row but the compute-matched one, none for the
    # untrained ones
    matched = "pixel_mim_matched"
    steps = {row["pretraining_steps"] for key, row in state["rows"].items() if key not in untrained | {matched}}
    assert steps == {state["settings"]["pretrain_steps"]}
    assert state["rows"][matched]["pretraining_steps"] == state["settings"]["matched_pixel_mim_steps"]
    assert state["settings"]["matched_pixel_mim_steps"] > state["settings"]["pretrain_steps"]
    assert all(state["rows"][key]["pretraining_steps"] == 0 for key in untrained)
    for key, row in state["rows"].items():
        if key not in untrained:
            assert row["pretraining_seconds"] > 0 and row["pretraining_images_per_second"] > 0
            assert row["pretraining_epochs"] == pytest.approx(
                row["pretraining_steps"] * state["settings"]["batch_size"] / state["num_pretraining_images"],
                abs=0.01,
            )

    table = state["table_markdown"].splitlines()
    assert table[0].startswith("| row | linear probe (CLS)") and set(table[1]) <= set("|-:")
    assert len(table) == 2 + len(ROW_KEYS)
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 8
        for cell in cells[1:5] + ([] if cells[0].startswith("raw pixels") else [cells[6]]):
            assert 0.0 <= float(cell) <= 100.0
        assert cells[5].count("±") == 2
    assert "| row | linear probe (CLS)" in completed.stdout  # the table is printed too

    tsne = Path(state["tsne_file"])
    assert tsne.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_model_card_is_generated_from_the_results(smoke_run):
    from modeling_mimco.hub.model_card import validate_model_card

    root, _, _, _ = smoke_run
    state = json.loads((root / "results" / "reproduce_results.json").read_text())
    card = validate_model_card(Path(state["model_card_file"]).read_text(), expect_eval_results=True)
    values = sorted(round(result.metric_value, 2) for result in card.data.eval_results)
    row = state["rows"]["mimco"]
    expected = sorted(round(100 * row[key], 2) for key in ("linear_probe_top1_cls", "knn_top1_cls", "finetune_top1"))
    assert values == expected


@pytest.mark.slow
def test_pixel_mim_encoder_is_evaluated_through_load_backbone(smoke_run):
    from transformers import ViTForMaskedImageModeling

    from modeling_mimco.interop.model_folders import load_backbone

    root, _, _, _ = smoke_run
    folder = root / "out" / "pixel_mim"
    backbone = load_backbone(str(folder))
    assert type(backbone.model).__name__ == "ViTModel"
    trained = ViTForMaskedImageModeling.from_pretrained(folder).vit
    loaded, encoder = backbone.model.state_dict(), trained.state_dict()
    # every trained encoder weight arrives (the mask token is only used in pre-training; the pooler is ViTModel's own)
    assert set(encoder) - {"embeddings.mask_token"} <= set(loaded)
    for name in set(encoder) & set(loaded):
        assert torch.equal(loaded[name], encoder[name]), name


@pytest.mark.slow
def test_rerun_skips_finished_rows_and_other_settings_start_afresh(smoke_run):
    root, flags, _, _ = smoke_run
    results = root / "results" / "reproduce_results.json"
    before = json.loads(results.read_text())["rows"]
    completed, _ = _run(*flags)
    assert completed.stdout.count("already in") == len(ROW_KEYS)
    assert "pre-training (" not in completed.stdout
    rerun = json.loads(results.read_text())
    assert rerun["rows"] == before
    first, second = rerun["invocations"]  # the first run trained every row, the rerun none
    assert sorted(first["rows_run"]) == sorted(ROW_KEYS) and second["rows_run"] == []

    # a row whose model was finished but whose evaluation was lost is evaluated again without pre-training again
    state = json.loads(results.read_text())
    del state["rows"]["mimco"]
    results.write_text(json.dumps(state))
    completed, _ = _run(*flags)
    assert "final model of" in completed.stdout and completed.stdout.count("pre-training (") == 1
    assert (
        json.loads(results.read_text())["rows"]["mimco"]["pretraining_seconds"]
        == before["mimco"]["pretraining_seconds"]
    )

    completed, _ = _run(*flags, "--probe_epochs", "2", "--rows", "random_init")
    assert "starting afresh" in completed.stdout
    state = json.loads(results.read_text())
    assert set(state["rows"]) == {"random_init"} and state["settings"]["probe_epochs"] == 2
    assert set(json.loads((root / "results" / "reproduce_results.json.previous").read_text())["rows"]) == ROW_KEYS


@pytest.mark.slow
def test_smoke_on_digits(tmp_path):
    """The fallback data source, end to end for the three rows of the t-SNE figure."""
    flags = ("--smoke", "--dataset_name", "digits", "--output_dir", str(tmp_path / "out"))
    _run(*flags, "--results_dir", str(tmp_path / "results"), "--rows", "teacher", "mimco", "pixel_mim")
    state = json.loads((tmp_path / "results" / "reproduce_results.json").read_text())
    assert state["settings"]["dataset"] == "digits"
    assert set(state["rows"]) == {"teacher", "mimco", "pixel_mim"}
    assert Path(state["tsne_file"]).is_file()


def test_smoke_falls_back_to_digits_without_the_local_cifar10(monkeypatch, tmp_path):
    from modeling_mimco.experiments.reproduction_arguments import HUB_CIFAR10, parse_args

    local = str(tmp_path / "absent")
    assert parse_args(["--smoke"], local).dataset_name == "digits"
    assert parse_args([], local).dataset_name == HUB_CIFAR10
    (tmp_path / "cifar10").mkdir()
    local = str(tmp_path / "cifar10")
    assert os.path.samefile(parse_args(["--smoke"], local).dataset_name, tmp_path / "cifar10")
    assert os.path.samefile(parse_args([], local).dataset_name, tmp_path / "cifar10")


def test_unknown_rows_and_bad_budget_are_refused():
    from modeling_mimco.experiments.reproduction_arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--rows", "mimco", "moco"])
    with pytest.raises(SystemExit):
        parse_args(["--budget_minutes", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--eval_repeats", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "1", "1"])


def test_step_plan_follows_the_budget():
    from modeling_mimco.experiments.reproduction_arguments import EVAL_SECONDS_PER_ROW, FIXED_SECONDS, ROWS, parse_args
    from modeling_mimco.experiments.reproduction_budget import plan_steps

    seconds = {"contrastive": 1.0, "mimco": 0.5, "simmim": 0.3}
    small = plan_steps(parse_args(["--budget_minutes", "60"]), seconds)["pretrain_steps"]
    large = plan_steps(parse_args(["--budget_minutes", "120"]), seconds)["pretrain_steps"]
    assert small % 10 == 0 and large % 10 == 0 and 20 <= small < large
    # the pixels and random-init rows cost no steps; the compute-matched pixel-MIM row costs a teacher + a student
    per_step = 1.0 + 0.3 + (1.0 + 0.5) + 4 * 0.5
    reserve = FIXED_SECONDS + EVAL_SECONDS_PER_ROW * len(ROWS)
    assert small == int((60 * 60 - reserve) / per_step) // 10 * 10
    plan = plan_steps(parse_args(["--budget_minutes", "60"]), seconds)
    assert plan["matched_pixel_mim_steps"] == round(small * (1.0 + 0.5) / 0.3)
    # three seeds share one teacher: its steps and its evaluation are counted once
    three = plan_steps(parse_args(["--budget_minutes", "240"]), seconds, num_seeds=3)
    reserve = FIXED_SECONDS + EVAL_SECONDS_PER_ROW * (3 * len(ROWS) - 2)
    assert three["pretrain_steps"] == int((240 * 60 - reserve) / (1.0 + 3 * (per_step - 1.0))) // 10 * 10 > 20
    # fewer pre-training rows leave more steps to each; a budget below the evaluation reserve still trains a little
    only_mimco = plan_steps(parse_args(["--budget_minutes", "60", "--rows", "mimco"]), seconds)
    reserve = FIXED_SECONDS + EVAL_SECONDS_PER_ROW
    assert only_mimco["pretrain_steps"] == int((60 * 60 - reserve) / 0.5) // 10 * 10
    assert plan_steps(parse_args(["--budget_minutes", "1"]), seconds)["pretrain_steps"] == 20
    # a machine that evaluates faster (the GPU check's) sets its own reserve; the steps follow it
    flags = ["--budget_minutes", "4", "--rows", "mimco", "--eval_seconds_per_row", "8", "--fixed_seconds", "25"]
    fast = plan_steps(parse_args(flags), seconds)
    assert fast["seconds_reserved_for_evaluation"] == 25 + 8
    assert fast["pretrain_steps"] == int((4 * 60 - 33) / 0.5) // 10 * 10
    with pytest.raises(SystemExit):
        parse_args(["--fixed_seconds", "-1"])


def test_markdown_table_lists_rows_in_table_order_and_marks_missing_values():
    from modeling_mimco.experiments.reproduction_report import markdown_table

    state = {
        "rows": {
            "mimco": {
                "linear_probe_top1_cls": 0.5,
                "linear_probe_top1_mean": 0.25,
                "knn_top1_cls": 0.125,
                "knn_top1_mean": 0.75,
                "finetune_top1": None,
                "pretraining_seconds": 90.0,
                "pretraining_images_per_second": 321.4,
                "evaluation_spread": {
                    "linear_probe_top1_cls": {"mean": 0.5, "std": 0.0125, "values": [0.5, 0.49, 0.51]},
                    "knn_top1_cls": {"mean": 0.125, "std": 0.0, "values": [0.125]},
                },
            },
            "random_init": {key: 0.1 for key in METRICS} | {"pretraining_seconds": None},
        }
    }
    lines = markdown_table(state).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| random initialisation | 10.0 |") and lines[2].endswith("| – / – | 10.0 | – |")
    assert lines[3] == (
        "| MimCo student (patch + image InfoNCE) | 50.0 | 25.0 | 12.5 | 75.0 | ±1.2 / – | – | 1.5 min, 321 img/s |"
    )


def test_seed_summary_is_mean_and_sample_std_over_the_seeds():
    from modeling_mimco.experiments.reproduction_report import SEED_METRICS, seed_summary, seed_summary_table

    def run(linear: float, finetune: float | None, seconds: float) -> dict:
        metrics = dict.fromkeys(SEED_METRICS, 0.5) | {"linear_probe_top1_cls": linear}
        return metrics | {"finetune_top1": finetune, "pretraining_seconds": seconds}

    states = {
        0: {"rows": {"mimco": run(0.40, 0.5, 60.0), "teacher": run(0.3, 0.4, 120.0)}},
        1: {"rows": {"mimco": run(0.44, 0.6, 90.0), "teacher": run(0.3, 0.4, 120.0)}},
        2: {"rows": {"mimco": run(0.42, 0.7, 120.0)}},  # this seed has no teacher row
    }
    summary = seed_summary(states)
    assert summary["seeds"] == [0, 1, 2] and set(summary["rows"]) == {"mimco"}  # only rows every seed has
    mimco = summary["rows"]["mimco"]
    assert mimco["linear_probe_top1_cls"]["mean"] == pytest.approx(0.42)
    assert mimco["linear_probe_top1_cls"]["std"] == pytest.approx(0.02)  # n - 1 in the denominator
    assert mimco["finetune_top1"]["values"] == [0.5, 0.6, 0.7]
    line = seed_summary_table(summary).splitlines()[2]
    assert (
        line == "| MimCo student (patch + image InfoNCE) | 42.0 ± 2.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 "
        "| 60.0 ± 10.0 | 1.5 min |"
    )


def test_runs_of_other_rows_merge_into_one_seed_summary(tmp_path):
    """`python -m modeling_mimco.experiments.reproduction_report OUT DIR...`: rows of several runs share one table (a
    row from the first folder that has it), and runs measured under other settings are refused in one line."""
    from modeling_mimco.experiments.reproduction_report import SEED_METRICS
    from modeling_mimco.experiments.reproduction_results import RESULTS_VERSION

    settings = {"version": RESULTS_VERSION, "dataset": "d", "pretrain_steps": 690, "eval_seed": 0, "seed": 0}

    def write(folder: str, seed: int, rows: dict, **changed) -> None:
        path = tmp_path / folder / f"seed-{seed}" / "reproduce_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = {key: dict.fromkeys(SEED_METRICS, value) for key, value in rows.items()}
        path.write_text(json.dumps({"settings": {**settings, "seed": seed, **changed}, "rows": rows}))

    for seed in (0, 1):
        write("student", seed, {"mimco": 0.5 + seed / 100, "teacher": 0.6})
        write("baselines", seed, {"pixel_mim": 0.3 + seed / 100, "mimco": 0.1})  # its mimco is not the table's
    write("baselines", 2, {"pixel_mim": 0.3})  # a seed the other folder lacks: left out
    command = [sys.executable, "-m", "modeling_mimco.experiments.reproduction_report", str(tmp_path / "out")]
    completed = subprocess.run(
        [*command, str(tmp_path / "student"), str(tmp_path / "baselines")], capture_output=True, text=True, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((tmp_path / "out" / "merged_summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["rows"]) == {"mimco", "teacher", "pixel_mim"}
    assert summary["rows"]["mimco"]["linear_probe_top1_cls"]["values"] == [0.5, 0.51]
    assert summary["rows"]["pixel_mim"]["knn_top1_cls"]["values"] == [0.3, 0.31]
    difference = [c for c in summary["comparisons"] if c["row"] == "pixel_mim" and c["metric"] == "knn_top1_cls"]
    assert difference[0]["difference"] == pytest.approx(0.2)
    assert (tmp_path / "out" / "merged_summary.png").is_file() and "| MimCo" in completed.stdout

    write("other_eval", 0, {"pixel_mim": 0.3}, eval_seed=1)
    refused = subprocess.run(
        [*command, str(tmp_path / "student"), str(tmp_path / "other_eval")], capture_output=True, text=True, cwd=REPO
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{tmp_path / 'other_eval'}/seed-0: measured under other settings" in refused.stderr
    assert "(eval_seed)" in refused.stderr


@pytest.mark.slow
def test_seeds_run_every_row_per_seed_on_the_same_evaluation_images(tmp_path):
    """`--seeds` through the script: one results file per pre-training seed, one teacher for all of them (trained
    with the first seed, its results reused), the compute-matched pixel-MIM row at its own step count, and a summary
    computed from the seeds with MimCo's differences against the seed spread."""
    flags = ("--smoke", "--output_dir", str(tmp_path / "out"), "--results_dir", str(tmp_path / "results"))
    rows = ("pixels", "random_init", "teacher", "mimco", "pixel_mim_matched")
    completed, _ = _run(*flags, "--seeds", "3", "4", "--rows", *rows, "--finetune_epochs", "0", "--eval_repeats", "1")
    summary = json.loads((tmp_path / "results" / "seed_summary.json").read_text())
    assert summary["seeds"] == [3, 4] and summary["table_markdown"] in completed.stdout
    assert (tmp_path / "results" / "seed_summary.md").read_text().strip() == summary["table_markdown"]
    per_seed = {
        seed: json.loads((tmp_path / "results" / f"seed-{seed}" / "reproduce_results.json").read_text())
        for seed in (3, 4)
    }
    assert [per_seed[seed]["settings"]["seed"] for seed in (3, 4)] == [3, 4]
    for key in ("pixels", "random_init"):
        values = [per_seed[seed]["rows"][key]["knn_top1_cls"] for seed in (3, 4)]
        assert summary["rows"][key]["knn_top1_cls"]["values"] == values
        assert per_seed[3]["rows"][key]["finetune_top1"] is None  # --finetune_epochs 0: no fine-tune
    # the pre-training seed changes the untrained network, not the evaluation images: the pixels score the same
    assert summary["rows"]["pixels"]["knn_top1_cls"]["std"] == 0.0
    random_features = [
        torch.load(tmp_path / "out" / f"seed-{seed}" / "features" / "random_init.pt", weights_only=True)
        for seed in (3, 4)
    ]
    assert torch.equal(random_features[0]["labels"], random_features[1]["labels"])
    assert not torch.equal(random_features[0]["features"], random_features[1]["features"])
    # one teacher, beside the seeds' folders, trained with the first seed; both seeds' students learnt from it
    assert (tmp_path / "out" / "teacher" / "model.safetensors").is_file()
    assert not any((tmp_path / "out" / f"seed-{seed}" / "teacher").exists() for seed in (3, 4))
    assert [per_seed[seed]["rows"]["teacher"]["trained_with_seed"] for seed in (3, 4)] == [3, 3]
    assert per_seed[4]["rows"]["teacher"] == per_seed[3]["rows"]["teacher"]
    assert [per_seed[seed]["rows"]["mimco"]["trained_with_seed"] for seed in (3, 4)] == [3, 4]
    # the compute-matched row trains the steps that a teacher and a student cost together
    settings = per_seed[3]["settings"]
    matched = settings["matched_pixel_mim_steps"]
    assert matched > settings["pretrain_steps"] and per_seed[4]["settings"]["matched_pixel_mim_steps"] == matched
    assert per_seed[3]["rows"]["pixel_mim_matched"]["pretraining_steps"] == matched
    # every comparison of MimCo with another row says whether it is larger than the two rows' seed spreads
    compared = {(item["row"], item["metric"]) for item in summary["comparisons"]}
    assert ("pixel_mim_matched", "linear_probe_top1_cls") in compared and ("teacher", "knn_top1_cls") in compared
    for item in summary["comparisons"]:
        assert item["larger_than_spread"] == (abs(item["difference"]) > item["seed_spread"])
    assert "larger than the spread?" in summary["table_markdown"]


def test_checkpoints_trained_under_other_settings_are_not_resumed(tmp_path):
    from modeling_mimco.experiments.reproduction_arguments import parse_args
    from modeling_mimco.experiments.reproduction_results import check_pretraining_settings, settings_of

    settings = settings_of(parse_args(["--smoke"]), {"pretrain_steps": 3})
    check_pretraining_settings(str(tmp_path), settings)
    check_pretraining_settings(str(tmp_path), {**settings, "probe_epochs": 1})  # evaluation only: fine
    with pytest.raises(SystemExit, match="pretrain_steps"):
        check_pretraining_settings(str(tmp_path), {**settings, "pretrain_steps": 4})


def test_teacher_crop_scale_reaches_stage_one(monkeypatch):
    """reproduce.py's teacher uses 25 % crops unless told otherwise (docs/results.md has the measurement)."""
    from modeling_mimco.commands import run_contrastive_pretraining as stage1
    from modeling_mimco.experiments.reproduction_arguments import parse_args
    from modeling_mimco.experiments.reproduction_pretraining import pretrain_contrastive
    from modeling_mimco.experiments.reproduction_results import settings_of

    seen = []
    monkeypatch.setattr(stage1, "run_contrastive_pretraining", lambda model_args, *rest: seen.append(model_args))
    for argv, expected in (([], 0.25), (["--stage1_crop_min_scale", "0.08"], 0.08)):
        args = parse_args(["--smoke", *argv])
        pretrain_contrastive(args, 3, "unused")
        assert seen[-1].crop_min_scale == expected
        assert settings_of(args, {"pretrain_steps": 3})["stage1_crop_min_scale"] == expected


def test_the_documented_reproduce_command_is_make_reproduce():
    """docs/results.md's command is the Makefile's `reproduce` recipe, and its flags parse to the main rows and 3
    seeds."""
    readme = (REPO / "docs" / "results.md").read_text()
    block = readme.split("<!-- reproduce command:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nreproduce:", 1)[1].splitlines()[1].strip()
    assert recipe.replace("$(BIN)/python ", "python ") == block
    from modeling_mimco.experiments.reproduction_arguments import COMPARED_ROWS, parse_args

    args = parse_args(block.split()[2:])
    assert args.seeds == [0, 1, 2] and args.budget_minutes == 120
    assert args.rows == ["pixels", "random_init", "teacher", "pixel_mim", "pixel_mim_matched", "mimco"]
    assert set(args.rows) == set(COMPARED_ROWS) | {"mimco"}  # every row MimCo is compared with


SHIPPED_CIFAR10_TEACHER = REPO / "model_cards" / "teachers" / "cifar10"


def test_a_given_teacher_costs_no_steps_and_the_matched_row_matches_the_student_alone():
    """`--teacher_name_or_path` (the paper's setting): the plan gives the teacher no steps, and pixel MIM at matched
    compute costs what the student costs, not teacher + student."""
    from modeling_mimco.experiments.reproduction_arguments import EVAL_SECONDS_PER_ROW, FIXED_SECONDS, ROWS, parse_args
    from modeling_mimco.experiments.reproduction_budget import compute_matched_steps, plan_steps

    seconds = {"contrastive": 1.0, "mimco": 0.5, "simmim": 0.25}
    assert compute_matched_steps(100, seconds) == 600 and compute_matched_steps(100, seconds, False) == 200
    args = parse_args(["--budget_minutes", "60", "--teacher_name_or_path", str(SHIPPED_CIFAR10_TEACHER)])
    plan = plan_steps(args, seconds)
    per_step = 0.25 + 0.25 * 2 + 4 * 0.5  # pixel MIM, pixel MIM at the student's compute, four students
    reserve = FIXED_SECONDS + EVAL_SECONDS_PER_ROW * len(ROWS)
    assert plan["pretrain_steps"] == int((60 * 60 - reserve) / per_step) // 10 * 10
    assert plan["matched_pixel_mim_steps"] == 2 * plan["pretrain_steps"]
    with pytest.raises(FileNotFoundError, match="no-such-teacher not found"):
        parse_args(["--teacher_name_or_path", str(REPO / "no-such-teacher")])


@pytest.mark.slow
def test_smoke_from_the_shipped_teacher_evaluates_it_without_training_it(tmp_path):
    """`make reproduce-given-teacher` at smoke size: the students learn from the shipped CIFAR-10 teacher, whose row
    is evaluated from its folder (nothing trained or written there), and the rows say what they are."""
    before = sorted(os.listdir(SHIPPED_CIFAR10_TEACHER))
    flags = ("--smoke", "--output_dir", str(tmp_path / "out"), "--results_dir", str(tmp_path / "results"))
    _run(
        *flags,
        "--teacher_name_or_path",
        str(SHIPPED_CIFAR10_TEACHER),
        "--rows",
        "teacher",
        "mimco",
        "pixel_mim_matched",
    )
    state = json.loads((tmp_path / "results" / "reproduce_results.json").read_text())
    assert state["settings"]["given_teacher"] == str(SHIPPED_CIFAR10_TEACHER)
    teacher = state["rows"]["teacher"]
    assert teacher["checkpoint"] == str(SHIPPED_CIFAR10_TEACHER) and teacher["pretraining_steps"] == 0
    assert teacher["name"].startswith("MoCo v3 teacher (given")
    assert state["rows"]["pixel_mim_matched"]["name"] == "pixel MIM at the student's compute"
    assert not (tmp_path / "out" / "teacher").exists()
    assert sorted(os.listdir(SHIPPED_CIFAR10_TEACHER)) == before
    assert "given, not trained here" in (tmp_path / "results" / "mimco_student_model_card.md").read_text()


def test_the_given_teacher_target_is_documented_and_parses(monkeypatch):
    """`make reproduce-given-teacher`: the Makefile's recipe parses to the main rows, 3 seeds, the shipped teacher
    and the main table's 690 steps, with outputs of its own."""
    from modeling_mimco.experiments.reproduction_arguments import parse_args

    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository, where make runs it

    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nreproduce-given-teacher:", 1)[1].split("\n\n", 1)[0]
    command = " ".join(line.strip().rstrip("\\") for line in recipe.splitlines()[1:]).split()
    args = parse_args(command[2:])
    assert args.seeds == [0, 1, 2] and args.pretrain_steps == 690
    assert args.teacher_name_or_path == "model_cards/teachers/cifar10"
    assert args.output_dir != "outputs/reproduce" and args.results_dir != "docs/results"
    assert "make reproduce-given-teacher" in (REPO / "docs" / "results.md").read_text()
