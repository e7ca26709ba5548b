"""The pre-training loop's own learning-rate schedules (`training/schedules.py`) against transformers' `get_scheduler`,
which they stand in for so that a pre-training process does not import transformers' Trainer utilities (and peft)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import get_scheduler

from modeling_mimco.training.arguments import PreTrainingArguments
from modeling_mimco.training.schedules import OWN_SCHEDULES, build_scheduler


def _learning_rates(scheduler, optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _optimizer(learning_rate: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=learning_rate)


@pytest.mark.parametrize("name", sorted(OWN_SCHEDULES))
@pytest.mark.parametrize("num_warmup_steps, num_training_steps", [(0, 1), (0, 10), (3, 10), (10, 10), (4, 37)])
def test_each_schedule_gives_transformers_learning_rates_at_every_step(name, num_warmup_steps, num_training_steps):
    ours = _optimizer()
    theirs = _optimizer()
    ours_rates = _learning_rates(build_scheduler(name, ours, num_warmup_steps, num_training_steps), ours, 45)
    their_scheduler = get_scheduler(
        name, theirs, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )
    their_rates = _learning_rates(their_scheduler, theirs, 45)
    assert ours_rates == their_rates  # the same floating-point operations: equal, not only close


def test_a_checkpointed_schedule_resumes_across_the_two_implementations():
    """A checkpoint written before this module (transformers' scheduler) resumes on ours, and the other way."""
    for write, read in ((get_scheduler, build_scheduler), (build_scheduler, get_scheduler)):
        first = _optimizer()
        scheduler = write("cosine", first, num_warmup_steps=2, num_training_steps=20)
        _learning_rates(scheduler, first, 7)
        resumed_optimizer = _optimizer()
        resumed = read("cosine", resumed_optimizer, num_warmup_steps=2, num_training_steps=20)
        resumed_optimizer.load_state_dict(first.state_dict())
        resumed.load_state_dict(scheduler.state_dict())
        assert _learning_rates(resumed, resumed_optimizer, 13) == pytest.approx(_learning_rates(scheduler, first, 13))


def test_other_schedules_are_transformers_own_and_bad_names_are_refused():
    optimizer = _optimizer()
    polynomial = build_scheduler("polynomial", optimizer, num_warmup_steps=1, num_training_steps=8)
    reference_optimizer = _optimizer()
    reference = get_scheduler("polynomial", reference_optimizer, num_warmup_steps=1, num_training_steps=8)
    assert _learning_rates(polynomial, optimizer, 10) == pytest.approx(
        _learning_rates(reference, reference_optimizer, 10)
    )
    PreTrainingArguments(output_dir="unused", lr_scheduler_type="cosine_with_restarts")
    with pytest.raises(ValueError, match="--lr_scheduler_type must be one of .*cosine.*; got 'cosine_decay'"):
        PreTrainingArguments(output_dir="unused", lr_scheduler_type="cosine_decay")


def test_the_training_loop_imports_neither_trainer_utilities_nor_peft():
    code = (
        "import sys; import modeling_mimco.training.loop, modeling_mimco.commands.run_pretraining; "
        "from modeling_mimco.training.arguments import PreTrainingArguments; "
        "PreTrainingArguments(output_dir='unused', lr_scheduler_type='cosine'); "
        "print(sorted(m for m in ('transformers.trainer_utils', 'transformers.optimization', 'peft') "
        "if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"
