"""`scripts/reproduce.py` (issue 7): the CIFAR-10 comparison table, run end to end in its `--smoke` mode.

The smoke run needs no network and no CIFAR-10: it uses `../shared/datasets/cifar10` when that folder exists and the
built-in digits data otherwise, so these tests always run. The numbers of a smoke run are noise (a few steps on a
few hundred images) and are not asserted; the shape of the outputs, the skipping of finished rows and the fairness
settings (one step count for every pre-trained row, the pixel-MIM encoder loaded through `evaluation.py`) are.
"""

from __future__ import annotations

import importlib.util
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
ROW_KEYS = {"random_init", "teacher", "pixel_mim", "mimco", "mimco_patch_only", "mimco_image_only", "mimco_smooth_l1"}
METRICS = ("linear_probe_top1_cls", "linear_probe_top1_mean", "knn_top1_cls", "knn_top1_mean", "finetune_top1")


def _load_script():
    spec = importlib.util.spec_from_file_location("_mimco_reproduce_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for key, row in state["rows"].items():
        for metric in METRICS:
            assert 0.0 <= row[metric] <= 1.0, (key, metric, row[metric])
        assert row["num_test_images"] > 0 and row["num_probe_train_images"] > 0
    # the same pre-training step count for every pre-trained row, none for random initialisation
    steps = {row["pretraining_steps"] for key, row in state["rows"].items() if key != "random_init"}
    assert steps == {state["settings"]["pretrain_steps"]}
    assert state["rows"]["random_init"]["pretraining_steps"] == 0
    assert all(row["pretraining_seconds"] > 0 for key, row in state["rows"].items() if key != "random_init")

    table = state["table_markdown"].splitlines()
    assert table[0].startswith("| row | linear probe (CLS)") and set(table[1]) <= set("|-:")
    assert len(table) == 2 + len(ROW_KEYS)
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 7
        for cell in cells[1:6]:
            assert 0.0 <= float(cell) <= 100.0
    assert "| row | linear probe (CLS)" in completed.stdout  # the table is printed too

    tsne = Path(state["tsne_file"])
    assert tsne.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_model_card_is_generated_from_the_results(smoke_run):
    from modeling_mimco.model_card import validate_model_card

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

    from modeling_mimco.model_folders import load_backbone

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
    module = _load_script()
    monkeypatch.setattr(module, "LOCAL_CIFAR10", str(tmp_path / "absent"))
    assert module.parse_args(["--smoke"]).dataset_name == "digits"
    assert module.parse_args([]).dataset_name == module.HUB_CIFAR10
    (tmp_path / "cifar10").mkdir()
    monkeypatch.setattr(module, "LOCAL_CIFAR10", str(tmp_path / "cifar10"))
    assert os.path.samefile(module.parse_args(["--smoke"]).dataset_name, tmp_path / "cifar10")
    assert os.path.samefile(module.parse_args([]).dataset_name, tmp_path / "cifar10")


def test_unknown_rows_and_bad_budget_are_refused():
    module = _load_script()
    with pytest.raises(SystemExit):
        module.parse_args(["--rows", "mimco", "moco"])
    with pytest.raises(SystemExit):
        module.parse_args(["--budget_minutes", "0"])


def test_step_plan_follows_the_budget():
    module = _load_script()
    seconds = {"contrastive": 1.0, "mimco": 0.5, "simmim": 0.3}
    small = module.plan_steps(module.parse_args(["--budget_minutes", "60"]), seconds)["pretrain_steps"]
    large = module.plan_steps(module.parse_args(["--budget_minutes", "120"]), seconds)["pretrain_steps"]
    assert small % 10 == 0 and large % 10 == 0 and 20 <= small < large
    per_step = 1.0 + 0.3 + 4 * 0.5
    reserve = module.FIXED_SECONDS + module.EVAL_SECONDS_PER_ROW * len(module.ROWS)
    assert small == int((60 * 60 - reserve) / per_step) // 10 * 10
    # fewer pre-training rows leave more steps to each; a budget below the evaluation reserve still trains a little
    only_mimco = module.plan_steps(module.parse_args(["--budget_minutes", "60", "--rows", "mimco"]), seconds)
    reserve = module.FIXED_SECONDS + module.EVAL_SECONDS_PER_ROW
    assert only_mimco["pretrain_steps"] == int((60 * 60 - reserve) / 0.5) // 10 * 10
    assert module.plan_steps(module.parse_args(["--budget_minutes", "1"]), seconds)["pretrain_steps"] == 20


def test_markdown_table_lists_rows_in_table_order_and_marks_missing_values():
    module = _load_script()
    state = {
        "rows": {
            "mimco": {
                "linear_probe_top1_cls": 0.5,
                "linear_probe_top1_mean": 0.25,
                "knn_top1_cls": 0.125,
                "knn_top1_mean": 0.75,
                "finetune_top1": None,
                "pretraining_seconds": 90.0,
            },
            "random_init": {key: 0.1 for key in METRICS} | {"pretraining_seconds": None},
        }
    }
    lines = module.markdown_table(state).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| random initialisation | 10.0 |") and lines[2].endswith("| – |")
    assert lines[3] == "| MimCo student (patch + image InfoNCE) | 50.0 | 25.0 | 12.5 | 75.0 | – | 1.5 min |"


def test_checkpoints_trained_under_other_settings_are_not_resumed(tmp_path):
    module = _load_script()
    settings = module.settings_of(module.parse_args(["--smoke"]), {"pretrain_steps": 3})
    module.check_pretraining_settings(str(tmp_path), settings)
    module.check_pretraining_settings(str(tmp_path), {**settings, "probe_epochs": 1})  # evaluation only: fine
    with pytest.raises(SystemExit, match="pretrain_steps"):
        module.check_pretraining_settings(str(tmp_path), {**settings, "pretrain_steps": 4})
