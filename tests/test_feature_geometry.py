"""`scripts/feature_geometry.py` and `evaluation.mean_pairwise_cosine`: the measure behind the results page's
finding that the teacher's CLS features all point one way."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_mimco.evaluation.frozen_features import mean_pairwise_cosine


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "feature_geometry.py"


def test_mean_pairwise_cosine_matches_the_pairs_one_by_one():
    features = torch.randn(7, 5) + torch.tensor([3.0, 0, 0, 0, 0])
    pairs = [
        torch.nn.functional.cosine_similarity(features[i], features[j], dim=0).item()
        for i, j in itertools.permutations(range(len(features)), 2)
    ]
    assert mean_pairwise_cosine(features) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    # one shared direction gives 1; a vector and its opposite give -1
    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_cosine(torch.randn(1, 4))


def test_script_prints_a_row_per_file_and_names_a_bad_file(tmp_path):
    spread = tmp_path / "spread.pt"
    torch.save({"features": torch.eye(4), "labels": torch.arange(4)}, spread)
    flat = tmp_path / "flat.pt"
    torch.save({"features": torch.ones(3, 2), "labels": torch.arange(3)}, flat)
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(spread), str(flat)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert f"| {spread} | 4 | 4 | 0.000 |" in completed.stdout
    assert f"| {flat} | 3 | 2 | 1.000 |" in completed.stdout

    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, not_ours)
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(not_ours)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 1
    assert str(not_ours) in completed.stderr and "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
