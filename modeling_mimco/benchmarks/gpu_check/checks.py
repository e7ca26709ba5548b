"""What every part of the GPU check is made of: its time `Budget`, its list of named `Checks`, `PartSkipped`, and
the numerical helpers the parts share (exact float32, relative differences, freeing device memory). Imports only
torch.
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from collections.abc import Callable, Iterator

import torch


class Budget:
    """A part's deadline: its own budget, cut short by the whole run's deadline."""

    def __init__(self, seconds: float, run_deadline: float):
        self.seconds = seconds
        self.deadline = min(time.perf_counter() + seconds, run_deadline)

    def remaining(self) -> float:
        return max(self.deadline - time.perf_counter(), 0.0)

    def expired(self) -> bool:
        return self.remaining() <= 0.0


class PartSkipped(Exception):
    """Raised by a part that cannot run here (no CUDA, no data); the message is the reason."""


class Checks:
    """A part's list of named checks: each passed, failed or skipped (with a reason), with what was measured."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, passed: bool, **details) -> bool:
        self.items.append({"name": name, "status": "ok" if passed else "failed", **details})
        return passed

    def skip(self, name: str, reason: str) -> None:
        self.items.append({"name": name, "status": "skipped", "reason": reason})

    def run(
        self, name: str, function: Callable[[], dict], budget: Budget | None = None, needs_seconds: float = 0.0
    ) -> dict | None:
        """Runs `function`, which returns the check's details with a boolean `"passed"`, and records the check.

        An exception becomes a failed check with its error (a failing check must not stop the kit); with less
        than `needs_seconds` of `budget` left, the check is skipped and says so. Returns the details, or None.
        """
        if budget is not None and budget.remaining() <= needs_seconds:
            self.skip(name, f"skipped: the part's time budget ({budget.seconds:.0f} s) was spent")
            return None
        try:
            details = function()
        except PartSkipped as skip:
            self.skip(name, str(skip))
            return None
        except Exception as error:
            self.items.append(
                {
                    "name": name,
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}"[:2000],
                    "traceback": traceback.format_exc(limit=8)[-4000:],
                }
            )
            return None
        passed = bool(details.pop("passed"))
        self.add(name, passed, **details)
        return details


def free_memory(device: str) -> None:
    """Collects garbage and, on CUDA, returns the allocator's cached blocks, so that the next check starts clean."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 products without TF32 (matmul and cuDNN convolutions), restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_difference(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """max |actual - expected| / max(max |expected|, floor), computed on the CPU in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(float(expected.abs().max()), floor)
    return float((actual - expected).abs().max()) / scale


__all__ = ["Budget", "Checks", "PartSkipped", "exact_fp32", "free_memory", "relative_difference"]
