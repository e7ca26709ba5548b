"""What a pre-training run counts and reports: the logging window (losses, images/s, gradient norm, summed on the
device between logging steps), the unreadable-image count that stops a run with too many, the start banner, the
plain `step N/M | ...` line of each logging step, and the facts of the run recorded beside its hyper-parameters.

It also holds the one rule for secrets that every program's writers follow (`is_secret_name`, `mask_secrets`,
`without_secrets`): an argument named `token` or ending in `_token` (`--hub_token`, `--token`) never reaches a file
that a program writes (tracker hyper-parameters and events, logs, results, checkpoints, the `Trainer`'s
`training_args.bin`).

It imports torch, Accelerate, `errors` and `arguments`; `loop` and `evaluation.finetuning` import it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from accelerate import Accelerator

from modeling_mimco.errors import MimCoError
from modeling_mimco.training.arguments import PreTrainingArguments
from modeling_mimco.training.sharding import fsdp_enabled


# --- unreadable images --------------------------------------------------------------------------------------------


class TooManyUnreadableImagesError(MimCoError):
    """Raised by `SkippedImageTracker` when the fraction of unreadable images exceeds `--max_skipped_fraction`."""


class SkippedImageTracker:
    """Counts unreadable images over a run and stops it when there are too many.

    Args:
        max_skipped_fraction: Largest tolerated fraction of unreadable images (`--max_skipped_fraction`); 1.0 never
            stops.
        min_seen: The check starts once this many images were seen, so that a few bad files at the start do not stop
            a run.

    `update(num_seen, num_skipped)` adds one batch: `num_seen` counts every example drawn (readable and unreadable,
    i.e. `len(pixel_values) + num_skipped`), `num_skipped` the unreadable ones. In a multi-process run, sum the counts
    over processes first (or keep one tracker per process). The counts are saved by `state_dict()` and restored by
    `load_state_dict()` (so `accelerator.register_for_checkpointing(tracker)` carries them across a resume); the
    thresholds come from the current run's flags.
    """

    def __init__(self, max_skipped_fraction: float = 0.05, min_seen: int = 100):
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"`max_skipped_fraction` must lie in [0, 1], got {max_skipped_fraction}.")
        if min_seen < 0:
            raise ValueError(f"`min_seen` must be >= 0, got {min_seen}.")
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.min_seen = int(min_seen)
        self.num_seen = 0
        self.num_skipped = 0

    @property
    def skipped_fraction(self) -> float:
        return self.num_skipped / self.num_seen if self.num_seen else 0.0

    def update(self, num_seen: int, num_skipped: int) -> None:
        """Adds the counts of one batch and raises `TooManyUnreadableImagesError` when the fraction is too high."""
        num_seen, num_skipped = int(num_seen), int(num_skipped)
        if num_seen < 0 or num_skipped < 0 or num_skipped > num_seen:
            raise ValueError(
                f"Counts must satisfy 0 <= num_skipped <= num_seen, got num_seen={num_seen}, num_skipped={num_skipped}."
            )
        self.num_seen += num_seen
        self.num_skipped += num_skipped
        if self.num_seen >= self.min_seen and self.skipped_fraction > self.max_skipped_fraction:
            raise TooManyUnreadableImagesError(
                f"{self.num_skipped} of {self.num_seen} images ({self.skipped_fraction:.2%}) could not be read, more "
                f"than the allowed {self.max_skipped_fraction:.2%} set by --max_skipped_fraction. Check the dataset "
                "(the warnings above name the unreadable files) or raise --max_skipped_fraction."
            )

    def summary(self) -> str:
        return (
            f"{self.num_skipped} of {self.num_seen} images skipped as unreadable ({self.skipped_fraction:.2%}; "
            f"limit {self.max_skipped_fraction:.2%}, --max_skipped_fraction)"
        )

    def state_dict(self) -> dict[str, int]:
        return {"num_seen": self.num_seen, "num_skipped": self.num_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.num_seen = int(state_dict["num_seen"])
        self.num_skipped = int(state_dict["num_skipped"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"


# --- the logging window -------------------------------------------------------------------------------------------


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 4:
            return value.shape[0]
    return 0


class LogWindow:
    """The steps since the last logging step, summed on the device so that a step needs no host sync.

    `state_dict` (called on every process, as checkpoints are) reduces the sums over processes, so a run resumed
    from a checkpoint written mid-window logs the same averages as the run it continues.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.parts: dict[str, torch.Tensor] = {}
        self.finite_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.images = 0
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self.start = time.perf_counter()

    def add_batch(self, batch: dict) -> int:
        """Counts a batch's images and the unreadable ones its collator dropped (it pops `num_skipped`); returns the
        number of images in the batch."""
        num_skipped = batch.pop("num_skipped", None)
        if num_skipped is not None:
            self.skipped = self.skipped + num_skipped.to(self.device)
        images = _batch_size(batch)
        self.images += images
        return images

    def add_step(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Adds one micro-batch's loss and extra scalars; a NaN/Inf loss is kept out of the averages."""
        finite = torch.isfinite(loss.detach())
        self.finite_steps = self.finite_steps + finite.long()
        detached = torch.where(finite, loss.detach(), 0.0)
        self.loss_sum = detached if self.loss_sum is None else self.loss_sum + detached
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + torch.where(finite, value.detach(), 0.0)

    def record(
        self,
        accelerator: Accelerator,
        step: int,
        lr: float,
        grad_norm: torch.Tensor | None,
        skipped: SkippedImageTracker,
    ) -> dict:
        """The window as one log record: images/s, the losses averaged over processes and finite steps, the last
        gradient norm. Its image counts, summed over processes, go to `skipped`, which stops a run with too many
        unreadable images. Every process must call it; this is where the window waits for the device."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        counts = torch.stack([torch.tensor(self.images, device=self.device), self.skipped])
        images, num_skipped = accelerator.reduce(counts, reduction="sum").tolist()
        skipped.update(images + num_skipped, num_skipped)
        record = {"step": step, "lr": lr, "images_per_second": images / elapsed}
        finite_steps = int(self.finite_steps)
        if finite_steps:
            record["loss"] = float(accelerator.reduce(self.loss_sum, "mean")) / finite_steps
            for name, value in self.parts.items():
                record[name] = float(accelerator.reduce(value, "mean")) / finite_steps
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def state_dict(self, accelerator: Accelerator) -> dict:
        """The window as numbers: loss sums averaged over processes, image counts summed."""

        def mean(value: torch.Tensor | None) -> float | None:
            return None if value is None else float(accelerator.reduce(value.detach().clone(), "mean"))

        counts = accelerator.reduce(
            torch.stack([torch.tensor(self.images, device=self.device), self.skipped]), reduction="sum"
        ).tolist()
        return {
            "loss_sum": mean(self.loss_sum),
            "parts": {name: mean(value) for name, value in self.parts.items()},
            "finite_steps": int(self.finite_steps),
            "images": counts[0],
            "skipped": counts[1],
        }

    def load_state_dict(self, state: dict, is_main_process: bool) -> None:
        """Restores a saved window; the image counts go to the main process only (`record` sums them over processes)."""
        self.reset()
        if state["loss_sum"] is not None:
            self.loss_sum = torch.tensor(state["loss_sum"], device=self.device)
        self.parts = {name: torch.tensor(value, device=self.device) for name, value in state["parts"].items()}
        self.finite_steps = torch.tensor(state["finite_steps"], device=self.device)
        if is_main_process:
            self.images = state["images"]
            self.skipped = torch.tensor(state["skipped"], device=self.device)


# --- secrets ------------------------------------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """Whether an argument or setting named `name` holds a secret: `token` and every name ending in `_token`."""
    return name == "token" or name.endswith("_token")


def _secret_values(value: Any, name: str = "") -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_secret_values(item, str(key)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_secret_values(item) for item in value))
    return {value} if is_secret_name(name) and isinstance(value, str) and value else set()


def _masked(value: Any, secrets: set[str], name: str = "") -> Any:
    if isinstance(value, dict):
        return {key: _masked(item, secrets, str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        masked = [_masked(item, secrets) for item in value]
        return masked if isinstance(value, list) else tuple(masked)
    if not isinstance(value, str) or not value:
        return value
    if is_secret_name(name):
        return f"<{name.upper()}>"
    for secret in secrets:
        value = value.replace(secret, "<SECRET>")
    return value


def mask_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values` fit to be written: each secret string (under a key that `is_secret_name` names, at any
    depth of dicts and lists) reads `<KEY>`, as transformers' `TrainingArguments.to_dict` writes `<HUB_TOKEN>`, and
    any other string that contains one of those secrets (a flag line, an object's repr) has it replaced by
    `<SECRET>`. `None`, booleans and numbers under such keys stay: they are no secret."""
    return _masked(values, _secret_values(values))


def without_secrets(arguments: Any) -> Any:
    """A shallow copy of the dataclass `arguments` whose secret string fields are `None`, for an object that gets
    saved whole (the `Trainer` pickles its arguments into `training_args.bin`); the original keeps its token for the
    upload at the end."""
    cleaned = copy.copy(arguments)
    for entry in dataclasses.fields(arguments):
        if is_secret_name(entry.name) and isinstance(getattr(arguments, entry.name, None), str):
            setattr(cleaned, entry.name, None)
    return cleaned


# --- what a run prints and records --------------------------------------------------------------------------------


def run_facts(accelerator: Accelerator) -> dict:
    """How the run actually trains, whatever the flags or the launcher said: recorded with the hyper-parameters."""
    return {
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type.value),
        "fsdp": fsdp_enabled(),  # the loop's own FSDP2 (Accelerate's distributed type stays that of plain processes)
        "num_processes": accelerator.num_processes,
        "device": accelerator.device.type,
    }


def start_banner(
    accelerator: Accelerator,
    args: PreTrainingArguments,
    num_examples: int | None,
    max_train_steps: int,
    steps_per_epoch: int | None,
) -> str:
    """The block printed before the first step, as the transformers `no_trainer` examples print it."""
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    epochs = f"{max_train_steps / steps_per_epoch:.2f}" if steps_per_epoch else "unknown (streaming)"
    lines = [
        "***** Running training *****",
        f"  Num examples = {num_examples if num_examples is not None else 'unknown (streaming)'}",
        f"  Num epochs = {epochs}",
        f"  Instantaneous batch size per device = {args.per_device_train_batch_size}",
        f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}",
        f"  Gradient accumulation steps = {args.gradient_accumulation_steps}",
        f"  Total optimization steps = {max_train_steps}",
        f"  Distributed type = {accelerator.distributed_type.value}, processes = {accelerator.num_processes}"
        + (", FSDP2 (trained weights sharded)" if fsdp_enabled() else ""),
        f"  Mixed precision = {accelerator.mixed_precision}",
    ]
    return "\n".join(lines)


def format_log_record(record: dict, max_train_steps: int) -> str:
    """One plain line per logging step, readable in a log file (the progress bar's postfix is not)."""
    fields = [f"step {record['step']}/{max_train_steps}"]
    for name, value in record.items():
        if name == "step":
            continue
        fields.append(f"{name} {value:.3e}" if name == "lr" else f"{name} {value:.4f}")
    return " | ".join(fields)


__all__ = [
    "LogWindow",
    "SkippedImageTracker",
    "TooManyUnreadableImagesError",
    "format_log_record",
    "is_secret_name",
    "mask_secrets",
    "run_facts",
    "start_banner",
    "without_secrets",
]
