"""The training loop that both pre-training stages share: Accelerate, AdamW, cosine schedule, atomic checkpoints,
resume mid-epoch, preemption and bad-step handling.

The scripts supply the model, the dataset, the collator and a `compute_loss` function; everything about devices,
processes, precision, checkpoints and logging lives here.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    is_tensorboard_available,
    parse_flag_from_env,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from .checkpointing import (
    CheckpointError,
    OutputDirInUseError,
    OutputDirLock,
    _write_json_atomically,
    check_output_dir,
    resume,
    save_checkpoint,
    save_final_atomically,
    verify_checkpoint,
)
from .errors import MimCoError
from .optimization import build_adamw, skip_update_if


logger = logging.getLogger(__name__)


@dataclass
class PreTrainingArguments:
    """Optimisation, checkpointing and logging settings shared by both pre-training scripts."""

    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final model are written."})
    seed: int = field(default=42, metadata={"help": "Random seed for initialisation, data order and masks."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process and step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(
        default=1.5e-4, metadata={"help": "Base learning rate for a global batch of 256; scaled linearly."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, tokens)."})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.95)
    max_grad_norm: float = field(default=3.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    num_train_epochs: float = field(default=100, metadata={"help": "Epochs, unless --max_train_steps is set."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides epochs."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the steps spent warming up."})
    num_warmup_steps: int | None = field(
        default=None, metadata={"help": "Warm-up steps; when set, it replaces --warmup_ratio."}
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "Learning-rate schedule after warm-up: any transformers SchedulerType (cosine, linear...)."},
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "'no', 'bf16' or 'fp16'. Default: what `accelerate launch` sets, else bf16 on a GPU with it."
        },
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the transformer backbones with torch.compile (student and teacher)."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    logging_steps: int = field(default=10, metadata={"help": "Log losses, lr, grad norm and images/s every N steps."})
    report_to: str = field(default="tensorboard", metadata={"help": "Tracker for accelerate: tensorboard or none."})
    with_tracking: bool = field(
        default=False,
        metadata={
            "help": "As in the transformers no_trainer examples. Tracking is on by default (--report_to); with this "
            "flag a tracker that is not installed is an error instead of a warning."
        },
    )
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Write a checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep only the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or the path of a checkpoint folder to continue from."}
    )
    max_consecutive_bad_steps: int = field(
        default=20, metadata={"help": "Stop after this many consecutive steps with a NaN/Inf loss."}
    )
    max_skipped_fraction: float = field(
        default=0.05, metadata={"help": "Stop when more than this fraction of images cannot be read."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token for --push_to_hub (default: HF_TOKEN or the cached login)."}
    )

    def __post_init__(self):
        _check_positive("per_device_train_batch_size", self.per_device_train_batch_size)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("num_train_epochs", self.num_train_epochs)
        _check_positive("logging_steps", self.logging_steps)
        _check_positive("max_consecutive_bad_steps", self.max_consecutive_bad_steps)
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "dataloader_num_workers"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.num_warmup_steps is not None and not self.num_warmup_steps >= 0:
            raise ValueError(f"--num_warmup_steps must be >= 0, got {self.num_warmup_steps}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must lie in [0, 1), got {getattr(self, name)}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must lie in [0, 1), got {self.warmup_ratio}.")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"--max_skipped_fraction must lie in [0, 1], got {self.max_skipped_fraction}.")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        try:
            SchedulerType(self.lr_scheduler_type)
        except ValueError:
            choices = ", ".join(member.value for member in SchedulerType)
            raise ValueError(
                f"--lr_scheduler_type must be one of {choices}; got {self.lr_scheduler_type!r}."
            ) from None
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to must be 'tensorboard' or 'none', got {self.report_to!r}.")
        if self.with_tracking and self.report_to == "none":
            raise ValueError("--with_tracking asks for a tracker but --report_to is 'none'.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")
        if self.resume_from_checkpoint not in (None, "latest"):
            try:
                verify_checkpoint(self.resume_from_checkpoint)
            except CheckpointError as error:
                raise ValueError(f"--resume_from_checkpoint: {error}") from error

    def warmup_steps(self, max_train_steps: int) -> int:
        """`--num_warmup_steps` if given, else `--warmup_ratio` of the run's optimizer steps."""
        if self.num_warmup_steps is not None:
            return self.num_warmup_steps
        return int(self.warmup_ratio * max_train_steps)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"--{name} must be positive, got {value}.")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's randomness (crop, flips, colour, mask) in one epoch of a run."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class _SeededBatches(torch.utils.data.Dataset):
    """Reads and collates each batch; every image's randomness comes from `sample_seed(seed, epoch, index)`.

    An image's augmentation and mask then depend only on the run's seed, the epoch and the image: not on the global
    RNG (which the model and the DataLoader also draw from), on Accelerate fetching one batch ahead, on the number
    of processes, the per-device batch, accumulation or workers. So a run resumed mid-epoch sees the batches of the
    run it continues, and N processes with batch B see the images of one process with batch N*B. The collator's
    per-image random step (`prepare_example`, the mask) runs under the same seed. The global RNG states are left as
    they were. Set `epoch` before each epoch's iterator is created (workers are not persistent, so they see it).
    """

    def __init__(self, dataset, collator: Callable, seed: int):
        self.dataset, self.collator, self.seed = dataset, collator, seed
        self.epoch = 0
        self._prepare_example = getattr(collator, "prepare_example", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def _example(self, index: int) -> dict:
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__([index])[0]
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                examples = []
                for index in indices:
                    seed = sample_seed(self.seed, self.epoch, int(index))
                    torch.default_generator.manual_seed(seed)  # CPU only: accelerator RNGs stay untouched
                    random.seed(seed)
                    np.random.seed(seed)
                    example = self._example(int(index))
                    if self._prepare_example is not None:
                        example = self._prepare_example(example)
                    examples.append(example)
                return [self.collator(examples)]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _only_batch(batches: list[dict]) -> dict:
    return batches[0]


class TrainingDivergedError(MimCoError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


# --- checkpoints -------------------------------------------------------------------------------------------------


# --- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What a run did: steps, losses at each logging step, and skipped work."""

    global_step: int
    log_history: list[dict]
    bad_steps: int
    skipped_images: int
    output_dir: str


class _Preemption:
    """Turns SIGTERM into a flag that the loop checks between steps, so a checkpoint is written before exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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

    def add_step(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Adds one micro-batch's loss and extra scalars; a NaN/Inf loss is kept out of the averages."""
        finite = torch.isfinite(loss.detach())
        self.finite_steps = self.finite_steps + finite.long()
        detached = torch.where(finite, loss.detach(), 0.0)
        self.loss_sum = detached if self.loss_sum is None else self.loss_sum + detached
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + torch.where(finite, value.detach(), 0.0)

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
        """Restores a saved window; the image counts go to the main process only (the flush sums them)."""
        self.reset()
        if state["loss_sum"] is not None:
            self.loss_sum = torch.tensor(state["loss_sum"], device=self.device)
        self.parts = {name: torch.tensor(value, device=self.device) for name, value in state["parts"].items()}
        self.finite_steps = torch.tensor(state["finite_steps"], device=self.device)
        if is_main_process:
            self.images = state["images"]
            self.skipped = torch.tensor(state["skipped"], device=self.device)


def run_facts(accelerator: Accelerator) -> dict:
    """How the run actually trains, whatever the flags or the launcher said: recorded with the hyper-parameters."""
    return {
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type.value),
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
        f"  Distributed type = {accelerator.distributed_type.value}, processes = {accelerator.num_processes}",
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


def create_accelerator(args: PreTrainingArguments) -> Accelerator:
    """The run's `Accelerator`: devices, processes, mixed precision and the tracker.

    Build it before anything else asks which process it is (data sharding), so that the launcher's settings
    (`accelerate launch`'s environment, e.g. `ACCELERATE_USE_CPU`) take effect. Raises `ValueError` for a setup that
    cannot train: FSDP, processes that do not see each other, fp16 without a GPU, a missing tracker with
    `--with_tracking`.
    """
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):  # set by `accelerate launch` for an FSDP config
        # refused before the Accelerator is built: on a machine without GPUs, building it would already fail
        raise ValueError(
            "FSDP is not supported by the MimCo pre-training scripts: the frozen teacher and the momentum encoder "
            "would be sharded with the trained weights. Use DDP (`accelerate launch --multi_gpu ...`, or "
            "`distributed_type: MULTI_GPU` in the accelerate config); a ViT-S/B student fits one GPU."
        )
    mixed_precision = args.mixed_precision
    if mixed_precision is None and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        # the paper-scale recipe trains in bf16; a GPU that supports it gets it unless told otherwise
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard" and not is_tensorboard_available():
        if args.with_tracking:
            raise ValueError("--with_tracking: TensorBoard is not installed (pip install tensorboard).")
        logger.warning("TensorBoard is not installed: losses are only printed (pip install tensorboard to log them).")
        report_to = None
    check_output_dir(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        raise ValueError(
            f"{torch.distributed.get_world_size()} processes were started but Accelerate sees "
            f"{accelerator.num_processes}: on a machine without GPUs, launch with `ACCELERATE_USE_CPU=1 accelerate "
            "launch --multi_gpu --num_processes N ...` so that the processes train together."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would silently train in float32: fp16 autocast and loss scaling exist only on GPUs
        raise ValueError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 (or no).")
    return accelerator


def train(
    args: PreTrainingArguments,
    model: torch.nn.Module,
    train_dataset,
    collator: Callable,
    compute_loss: Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    save_final: Callable[[torch.nn.Module, str], None],
    project_name: str = "mimco",
    run_config: dict | None = None,
    accelerator: Accelerator | None = None,
) -> TrainingResult:
    """Trains `model` on `train_dataset` and saves the result with `save_final(unwrapped_model, output_dir)`.

    `compute_loss(model, batch, progress)` returns the loss and a dict of extra scalars to log; `progress` runs from
    0 to 1 over training (the stage-1 momentum schedule reads it). `accelerator` is the one `create_accelerator`
    built for the run (a new one by default). Returns a `TrainingResult`.
    """
    if accelerator is None:
        accelerator = create_accelerator(args)
    lock = OutputDirLock(args.output_dir) if accelerator.is_main_process else None
    refusal = lock.acquire() if lock is not None else None
    # every process must stop, not only the one that holds the lock
    if accelerator.num_processes > 1:
        refused = accelerator.gather(torch.tensor([refusal is not None], device=accelerator.device)).any()
    else:
        refused = refusal is not None
    if refused:
        raise OutputDirInUseError(refusal or f"--output_dir {args.output_dir!r} is in use by another run.")
    try:
        return _train(
            args, accelerator, model, train_dataset, collator, compute_loss, save_final, project_name, run_config
        )
    finally:
        if lock is not None:
            lock.release()


def _train(
    args: PreTrainingArguments,
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_dataset,
    collator: Callable,
    compute_loss: Callable,
    save_final: Callable[[torch.nn.Module, str], None],
    project_name: str,
    run_config: dict | None,
) -> TrainingResult:
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    is_iterable = not hasattr(train_dataset, "__len__")
    seeded_dataset = None if is_iterable else _SeededBatches(train_dataset, collator, args.seed)
    dataloader = DataLoader(
        train_dataset if is_iterable else seeded_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not is_iterable,
        # its own generator, so that starting an epoch's iterator does not draw from the global RNG
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=collator if is_iterable else _only_batch,
        num_workers=args.dataloader_num_workers,
        # not persistent: each epoch's workers must see `seeded_dataset.epoch`
        persistent_workers=False,
        drop_last=not is_iterable,
    )

    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    learning_rate = args.learning_rate * global_batch / 256
    optimizer = build_adamw(model, learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2))

    if args.max_train_steps is not None:
        max_train_steps = args.max_train_steps
    elif is_iterable:
        raise ValueError("A streaming dataset has no length: set --max_train_steps.")
    if not is_iterable:
        per_process_batches = len(train_dataset) // (args.per_device_train_batch_size * accelerator.num_processes)
        if per_process_batches == 0:
            raise ValueError(
                f"The dataset has {len(train_dataset)} images, fewer than one global batch of "
                f"{args.per_device_train_batch_size * accelerator.num_processes}: lower --per_device_train_batch_size."
            )
        steps_per_epoch = max(per_process_batches // args.gradient_accumulation_steps, 1)
        if args.max_train_steps is None:
            max_train_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps(max_train_steps),
        num_training_steps=max_train_steps,
    )

    if is_iterable:
        # A streaming dataset is already sharded per process (`shard_for_process`); Accelerate must not shard it
        # again or dispatch it from the main process, so only the batches' device placement is done here.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    skipped = SkippedImageTracker(max_skipped_fraction=args.max_skipped_fraction)
    accelerator.register_for_checkpointing(skipped)

    global_step, epoch, batches_done_in_epoch = 0, 0, 0
    bad_steps = 0
    log_history: list[dict] = []
    window = LogWindow(accelerator.device)
    if args.resume_from_checkpoint:
        state = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
        if state is not None:
            global_step, epoch = state["global_step"], state["epoch"]
            batches_done_in_epoch, bad_steps = state["batches_done_in_epoch"], state["bad_steps"]
            log_history = state["log_history"]
            if state.get("log_window") is not None:  # older checkpoints have none
                window.load_state_dict(state["log_window"], accelerator.is_main_process)

    run_config = {**(run_config or asdict(args)), **run_facts(accelerator)}
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(project_name, config=_flat_config(run_config))
    accelerator.print(
        start_banner(
            accelerator,
            args,
            num_examples=None if is_iterable else len(train_dataset),
            max_train_steps=max_train_steps,
            steps_per_epoch=None if is_iterable else steps_per_epoch,
        )
    )

    def trainer_state() -> dict:
        return {
            "global_step": global_step,
            "epoch": epoch,
            "batches_done_in_epoch": batches_done_in_epoch,
            "bad_steps": int(bad_steps_total),
            "log_history": log_history,
            "log_window": window.state_dict(accelerator),
        }

    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="Training"
    )

    def any_process(flag: bool) -> bool:
        if accelerator.num_processes == 1:
            return flag
        return bool(accelerator.gather(torch.tensor([flag], device=accelerator.device)).any())

    def flush_window(grad_norm: torch.Tensor | None) -> int:
        """Turns the device-side sums of the logging window into a log record; returns the bad-step total."""
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        counts = accelerator.reduce(
            torch.stack([torch.tensor(window.images, device=accelerator.device), window.skipped, bad_steps_total]),
            reduction="sum",
        ).tolist()
        images, num_skipped = counts[0], counts[1]
        skipped.update(images + num_skipped, num_skipped)
        record = {"step": global_step, "lr": scheduler.get_last_lr()[0], "images_per_second": images / elapsed}
        finite_steps = int(window.finite_steps)
        if finite_steps:
            record["loss"] = float(accelerator.reduce(window.loss_sum, "mean")) / finite_steps
            for name, value in window.parts.items():
                record[name] = float(accelerator.reduce(value, "mean")) / finite_steps
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        log_history.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=global_step)
        if "loss" in record:
            progress_bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if accelerator.is_main_process:
            progress_bar.write(format_log_record(record, max_train_steps))
        window.reset()
        return int(bad_steps_total)

    grad_norm = None
    bad_steps_total = torch.tensor(bad_steps, device=accelerator.device)
    consecutive_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)

    with _Preemption() as preemption:
        with progress_bar:
            while global_step < max_train_steps:
                if is_iterable:
                    if hasattr(train_dataset, "set_epoch"):
                        train_dataset.set_epoch(epoch)
                    epoch_loader = itertools.islice(dataloader, batches_done_in_epoch, None)
                else:
                    seeded_dataset.epoch = epoch
                    dataloader.set_epoch(epoch)
                    epoch_loader = dataloader
                    if batches_done_in_epoch > 0:
                        epoch_loader = accelerator.skip_first_batches(dataloader, batches_done_in_epoch)
                for batch in epoch_loader:
                    if is_iterable:
                        batch = {
                            k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                        }
                    batches_done_in_epoch += 1
                    num_skipped = batch.pop("num_skipped", None)
                    if num_skipped is not None:
                        window.skipped = window.skipped + num_skipped.to(accelerator.device)
                    local_images = _batch_size(batch)
                    window.images += local_images
                    # A batch whose images were all unreadable is skipped; every process must agree, or the gradient
                    # all-reduce would wait forever.
                    if any_process(local_images == 0):
                        continue

                    with accelerator.accumulate(model):
                        progress = global_step / max_train_steps
                        loss, parts = compute_loss(model, batch, progress)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            # The global gradient norm is identical on every process, so its finiteness decides the
                            # skip everywhere without another collective; a NaN/Inf loss makes it non-finite too.
                            grad_norm = accelerator.clip_grad_norm_(
                                model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else math.inf
                            )
                            if not isinstance(grad_norm, torch.Tensor):  # DeepSpeed clips inside its own step
                                grad_norm = torch.tensor(float(grad_norm or 0.0), device=accelerator.device)
                            bad = ~torch.isfinite(grad_norm)
                            skip_update_if(optimizer, bad, accelerator)
                            bad_steps_total += bad.long()
                            consecutive_bad = (consecutive_bad + 1) * bad.long()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)

                    # a step with a NaN/Inf loss is skipped, and kept out of the logged averages as well
                    window.add_step(loss, parts)

                    if not accelerator.sync_gradients:
                        continue
                    scheduler.step()
                    global_step += 1
                    progress_bar.update(1)

                    if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                        # `.item()` synchronises with the device, so it only happens at logging steps.
                        bad_steps = flush_window(grad_norm)
                        if int(consecutive_bad) >= args.max_consecutive_bad_steps:
                            raise TrainingDivergedError(
                                f"{int(consecutive_bad)} consecutive steps had a NaN/Inf loss or gradient (up to step "
                                f"{global_step}); stopping. Lower --learning_rate, use bf16 instead of fp16, or check the "
                                "data. The last checkpoint is intact."
                            )

                    stop = any_process(preemption.requested)
                    if (args.checkpointing_steps and global_step % args.checkpointing_steps == 0) or stop:
                        folder = save_checkpoint(
                            accelerator, args.output_dir, global_step, trainer_state(), args.checkpoints_total_limit
                        )
                        accelerator.print(f"Saved checkpoint {folder}")
                    if stop:
                        accelerator.print("SIGTERM received: checkpoint written, exiting.")
                        accelerator.end_training()
                        raise SystemExit(143)
                    if global_step >= max_train_steps:
                        break
                else:
                    epoch += 1
                    batches_done_in_epoch = 0
                    continue
                break

        bad_steps = int(bad_steps_total)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # still under the SIGTERM handler: a SIGTERM now lets the final model be written whole first
            save_final_atomically(save_final, accelerator.unwrap_model(model), args.output_dir)
            _write_json_atomically(
                os.path.join(args.output_dir, "train_results.json"),
                {
                    "global_step": global_step,
                    "bad_steps": bad_steps,
                    "skipped_images": skipped.num_skipped,
                    **run_facts(accelerator),
                    "log_history": log_history,
                },
            )
        if any_process(preemption.requested):
            accelerator.print("SIGTERM received during the final save: the final model was written whole, exiting.")
            accelerator.end_training()
            raise SystemExit(143)
    if accelerator.is_main_process and args.push_to_hub:
        from .hub import push_to_hub  # the one checked upload path: model card, file list, secret check

        push_to_hub(
            args.output_dir,
            args.hub_model_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            commit_message="Upload MimCo pre-training output",
            log=accelerator.print,
        )
    accelerator.end_training()
    if skipped.num_skipped:
        accelerator.print(skipped.summary())
    return TrainingResult(global_step, log_history, bad_steps, skipped.num_skipped, args.output_dir)


def _flat_config(config: dict) -> dict:
    """Tracker hyper-parameters must be scalars."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


__all__ = [
    "create_accelerator",
    "PreTrainingArguments",
    "TrainingResult",
    "train",
]


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
