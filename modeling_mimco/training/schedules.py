"""The learning-rate schedules of the pre-training loop, built without importing transformers' Trainer utilities.

transformers' `get_scheduler` lives in `transformers.optimization`, which imports `transformers.trainer_utils`, which
imports peft where peft is installed: about half a CPU-second at the start of every pre-training process (a 2-step
`mimco-contrastive` run: 9.6-9.8 CPU-s before, 9.0-9.6 after), for a function of the step. The schedules the
package's recipes use (`OWN_SCHEDULES`) are written here as the same functions of the step as transformers'
(tests/test_schedules.py compares them step by step, and their checkpointed state loads either way); any other
`--lr_scheduler_type` is built by transformers' `get_scheduler`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler


def _warmup(step: int, num_warmup_steps: int) -> float:
    return step / max(1, num_warmup_steps)


def _constant(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    return 1.0  # as transformers' "constant": no warm-up


def _constant_with_warmup(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def _linear(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))


def _cosine(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """Half a cosine period from 1 after the warm-up to 0 at `num_training_steps` (transformers' 0.5 cycles)."""
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


OWN_SCHEDULES = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
}
"""`--lr_scheduler_type` values built here: the learning-rate factor as a function of the step."""


def build_scheduler(name: str, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int) -> LRScheduler:
    """The schedule `name` over `num_training_steps` steps with `num_warmup_steps` of linear warm-up: a `LambdaLR`
    whose factor is a `functools.partial` (as transformers builds it, so a checkpointed state loads into either), or
    transformers' `get_scheduler` for a name not in `OWN_SCHEDULES`."""
    from torch.optim.lr_scheduler import LambdaLR

    name = str(getattr(name, "value", name))  # a transformers `SchedulerType` member names its schedule
    if name not in OWN_SCHEDULES:
        from transformers import get_scheduler

        return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    factor = functools.partial(
        OWN_SCHEDULES[name], num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )
    return LambdaLR(optimizer, factor)
