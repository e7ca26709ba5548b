"""`host_memory.keep_freed_memory`: a step's freed tensors are reused by the next step instead of being faulted in
again. Each count comes from a fresh process, so that the allocator starts from glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]

# the shape of a CPU training step: many 4 MB fp32 activations alive at once, written, then all freed
ACTIVATIONS, ACTIVATION_BYTES = 20, 4 * 1024 * 1024

CHILD = f"""
import resource, sys
import torch
# what a training process has imported before its first step (the package itself no longer imports it: it is lazy,
# and a bare torch process sits at this test's bound, one 4 MB activation faulted in again per step)
import modeling_mimco.training.loop
from modeling_mimco.training.host_memory import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory() is True

def step():
    activations = [torch.ones({ACTIVATION_BYTES // 4}) for _ in range({ACTIVATIONS})]
    del activations

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _page_faults_per_step(mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return float(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    # How much of the 80 MB glibc's defaults give back and fault in again varies between machines (about 20,000
    # faults per step on one, about 4,300 on another), so the bound is on the pages a step touches, not on that count.
    import resource

    pages_touched = ACTIVATIONS * ACTIVATION_BYTES / resource.getpagesize()
    kept = _page_faults_per_step("keep")
    assert kept < pages_touched / 20, (kept, pages_touched, _page_faults_per_step("default"))


def test_keep_freed_memory_changes_nothing_without_glibc(monkeypatch):
    from modeling_mimco.training import host_memory

    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False
