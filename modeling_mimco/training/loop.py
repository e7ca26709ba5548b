"""The Accelerate pre-training loop that both stages share.

It owns a run from its data to its final save: the DataLoader whose per-image randomness comes from `sample_seed`,
AdamW with a linearly scaled learning rate and its schedule, `accelerator.prepare`, resuming mid-epoch, gradient
accumulation and clipping, skipping NaN/Inf steps, logging steps, checkpoints every N steps, SIGTERM (a checkpoint,
then exit code 143), the final model and `train_results.json`. The scripts supply the model, the dataset, the
collator, `compute_loss` and `save_final`. It imports `arguments` (the flags), `log` (what a run counts and
prints), `checkpointing` (checkpoint folders, resume, the output-folder lock), `optimization` (AdamW), `orphans`
(SIGTERM when the launcher dies), `failures` (a lost or hung peer as one line) and `errors`, and `hub.upload` only
for `--push_to_hub`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    is_tensorboard_available,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_mimco.errors import MimCoError
from modeling_mimco.training.arguments import PreTrainingArguments
from modeling_mimco.training.checkpointing import (
    OutputDirInUseError,
    OutputDirLock,
    check_output_dir,
    last_complete_checkpoint,
    resume,
    save_checkpoint,
    save_final_atomically,
    write_json_atomically,
)
from modeling_mimco.training.failures import RunPosition, collective_failure
from modeling_mimco.training.log import (
    LogWindow,
    SkippedImageTracker,
    format_log_record,
    mask_secrets,
    run_facts,
    start_banner,
)
from modeling_mimco.training.optimization import build_adamw, skip_update_if
from modeling_mimco.training.orphans import end_with_launcher
from modeling_mimco.training.schedules import build_scheduler
from modeling_mimco.training.sharding import (
    ShardedModel,
    ShardingPlan,
    fsdp_enabled,
    full_tensor,
    gather_for_saving,
    shard_model,
    state_bytes,
    take_fsdp_request,
)


logger = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's randomness (crop, flips, colour, mask) in one epoch of a run."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededBatches(torch.utils.data.Dataset):
    """Reads and collates each batch; every image's randomness comes from `sample_seed(seed, epoch, index)`.

    Each example also carries its seed as `"sample_seed"`, which the collators stack as the batch's `"sample_seeds"`:
    the model draws the image's stochastic depth and dropout from it, so those too follow the image.

    An image's augmentation and mask then depend only on the run's seed, the epoch and the image: not on the global
    RNG (which the model and the DataLoader also draw from), on Accelerate fetching one batch ahead, on the number
    of processes, the per-device batch, accumulation or workers. So a run resumed mid-epoch sees the batches of the
    run it continues, and N processes with batch B see the images of one process with batch N*B. The collator's
    per-image random step (`prepare_example`, the mask) runs under the same seed. The global RNG states are left as
    they were. Set `epoch` before each epoch's iterator is created: it is held in shared memory, so that persistent
    DataLoader workers (started once per run, not once per epoch) read the new value.
    """

    def __init__(self, dataset, collator: Callable, seed: int):
        self.dataset, self.collator, self.seed = dataset, collator, seed
        self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._prepare_example = getattr(collator, "prepare_example", None)

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._shared_epoch.fill_(epoch)

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
                examples, epoch = [], self.epoch
                for index in indices:
                    seed = sample_seed(self.seed, epoch, int(index))
                    torch.default_generator.manual_seed(seed)  # CPU only: accelerator RNGs stay untouched
                    random.seed(seed)
                    np.random.seed(seed)
                    example = self._example(int(index))
                    if self._prepare_example is not None:
                        example = self._prepare_example(example)
                    # the model draws the image's stochastic depth and dropout from it too (`sample_seeds`)
                    example["sample_seed"] = seed
                    examples.append(example)
                return [self.collator(examples)]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def only_batch(batches: list[dict]) -> dict:
    return batches[0]


def build_dataloader(
    args: PreTrainingArguments, train_dataset, collator: Callable
) -> tuple[DataLoader, SeededBatches | None]:
    """The run's DataLoader: shuffled `SeededBatches` for a dataset with a length, else the stream in order."""
    streaming = not hasattr(train_dataset, "__len__")
    seeded_dataset = None if streaming else SeededBatches(train_dataset, collator, args.seed)
    dataloader = DataLoader(
        train_dataset if streaming else seeded_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not streaming,
        # its own generator, so that starting an epoch's iterator does not draw from the global RNG
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=collator if streaming else only_batch,
        num_workers=args.dataloader_num_workers,
        # Workers that last the whole run, not forked again (and waited for) at every epoch. The seeded batches
        # read their epoch from shared memory; a stream's `set_epoch` would not reach a persistent worker's copy,
        # so a stream's workers start anew each epoch.
        persistent_workers=args.dataloader_num_workers > 0 and not streaming,
        drop_last=not streaming,
    )
    return dataloader, seeded_dataset


def stream_seed(seed: int, epoch: int) -> int:
    """The seed of a stream's DataLoader generator in one epoch, from which its workers' RNGs are seeded."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def stream_batches(dataloader: DataLoader, train_dataset, seed: int, epoch: int, start_batch: int = 0) -> Iterator:
    """One epoch of a stream's batches (on the CPU), from batch `start_batch` on: what the loop trains on.

    A stream has no index to seek to, so a run resumed mid-epoch reads the epoch's first `start_batch` batches again
    and drops them: the DataLoader's workers hand out batches in a fixed round-robin order and each reads its own
    shards in order, so the batches that follow are those the uninterrupted run saw. Seeding the generator per epoch
    (`stream_seed`) gives the workers the RNG states of the uninterrupted run's epoch too, and the dropped batches
    draw their augmentations and masks as they did, so the following ones are augmented and masked alike.
    """
    if hasattr(train_dataset, "set_epoch"):
        train_dataset.set_epoch(epoch)
    dataloader.generator.manual_seed(stream_seed(seed, epoch))
    yield from itertools.islice(dataloader, start_batch, None)


def _count_steps(args: PreTrainingArguments, train_dataset, num_processes: int) -> tuple[int, int | None]:
    """The run's optimizer steps and, for a dataset with a length, the optimizer steps of one epoch."""
    if not hasattr(train_dataset, "__len__"):
        if args.max_train_steps is None:
            raise ValueError("A streaming dataset has no length: set --max_train_steps.")
        return args.max_train_steps, None
    per_process_batches = len(train_dataset) // (args.per_device_train_batch_size * num_processes)
    if per_process_batches == 0:
        raise ValueError(
            f"The dataset has {len(train_dataset)} images, fewer than one global batch of "
            f"{args.per_device_train_batch_size * num_processes}: lower --per_device_train_batch_size."
        )
    steps_per_epoch = max(per_process_batches // args.gradient_accumulation_steps, 1)
    if args.max_train_steps is not None:
        return args.max_train_steps, steps_per_epoch
    return math.ceil(args.num_train_epochs * steps_per_epoch), steps_per_epoch


# --- processes ----------------------------------------------------------------------------------------------------


def create_accelerator(args: PreTrainingArguments) -> Accelerator:
    """The run's `Accelerator`: devices, processes, mixed precision and the tracker.

    Build it before anything else asks which process it is (data sharding), so that the launcher's settings
    (`accelerate launch`'s environment, e.g. `ACCELERATE_USE_CPU`) take effect. An FSDP config (`fsdp_version: 2`) is
    taken over by the loop (`sharding.take_fsdp_request`): Accelerate sets up plain processes, the loop shards. Raises
    `ValueError` for a setup that cannot train: FSDP1, FSDP options the loop does not support or `--torch_compile` with
    FSDP, processes that do not see each other, fp16 without a GPU, a missing tracker with `--with_tracking`.

    A process started by a launcher gets SIGTERM when the launcher dies (`orphans.end_with_launcher`), so that it
    checkpoints and exits 143, as on preemption, instead of training on with the output folder locked.
    """
    end_with_launcher()
    if take_fsdp_request() and args.torch_compile:  # before the Accelerator reads the launcher's FSDP flag
        raise ValueError("--torch_compile is not supported with FSDP yet: leave it out, or launch with DDP.")
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
        # how long a collective waits for a hung or stopped process before it fails (`failures`)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
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


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process; a collective, so every process must ask at the same point."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([flag], device=accelerator.device)).any())


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


def _exit_on_sigterm(accelerator: Accelerator, message: str) -> NoReturn:
    """Ends a preempted run with the exit code of a process stopped by SIGTERM (128 + 15)."""
    accelerator.print(message)
    accelerator.end_training()
    raise SystemExit(143)


# --- the loop -----------------------------------------------------------------------------------------------------


class TrainingDivergedError(MimCoError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


@dataclass
class TrainingResult:
    """What a run did: steps, losses at each logging step, and skipped work."""

    global_step: int
    log_history: list[dict]
    bad_steps: int
    skipped_images: int
    output_dir: str


@dataclass
class TrainingState:
    """Where a run stands, as `trainer_state.json` records it (with the logging window beside it).

    The bad-step counters stay on the device, so that an optimizer step needs no host sync; `grad_norm` is the last
    optimizer step's gradient norm, for the next log record.
    """

    bad_steps: torch.Tensor
    consecutive_bad_steps: torch.Tensor
    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    log_history: list[dict] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    run_plan: dict | None = None  # what the run does (`_set_up`), recorded so that a resume can be checked

    @classmethod
    def from_checkpoint(cls, saved: dict | None, device: torch.device) -> TrainingState:
        """The state of a checkpoint's `trainer_state.json`, or of a fresh run when `saved` is `None`."""
        saved = saved or {}
        return cls(
            bad_steps=torch.tensor(saved.get("bad_steps", 0), device=device),
            consecutive_bad_steps=torch.zeros((), dtype=torch.long, device=device),
            global_step=saved.get("global_step", 0),
            epoch=saved.get("epoch", 0),
            batches_done_in_epoch=saved.get("batches_done_in_epoch", 0),
            log_history=saved.get("log_history", []),
        )

    def to_checkpoint(self, window: LogWindow, accelerator: Accelerator) -> dict:
        """What `trainer_state.json` holds; every process must call it (the window reduces over processes)."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "bad_steps": int(self.bad_steps),
            "log_history": self.log_history,
            "log_window": window.state_dict(accelerator),
            "run_plan": self.run_plan,
        }


@dataclass
class _Run:
    """The prepared objects of one run, which the steps of the loop share."""

    args: PreTrainingArguments
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # Accelerate's wrapper of the learning-rate scheduler
    sharded: ShardedModel | None  # with FSDP: the sharded model (`model`) and its unsharded skeleton
    dataloader: DataLoader
    train_dataset: Any
    seeded_dataset: SeededBatches | None  # None for a streaming dataset
    compute_loss: Callable
    max_train_steps: int
    skipped: SkippedImageTracker
    window: LogWindow
    progress_bar: tqdm


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
    sharding_plan: ShardingPlan | None = None,
) -> TrainingResult:
    """Trains `model` on `train_dataset` and saves the result with `save_final(unwrapped_model, output_dir)`.

    `compute_loss(model, batch, progress)` returns the loss and a dict of extra scalars to log; `progress` runs from
    0 to 1 over training (the stage-1 momentum schedule reads it). `accelerator` is the one `create_accelerator`
    built for the run (a new one by default). `sharding_plan` says how FSDP shards the model (its blocks, and the
    frozen modules it keeps whole on every process); required when the run was launched with FSDP. Returns a
    `TrainingResult`.
    """
    if accelerator is None:
        accelerator = create_accelerator(args)
    lock = OutputDirLock(args.output_dir) if accelerator.is_main_process else None
    refusal = lock.acquire() if lock is not None else None
    # every process must stop, not only the one that holds the lock
    if any_process(accelerator, refusal is not None):
        raise OutputDirInUseError(refusal or f"--output_dir {args.output_dir!r} is in use by another run.")
    position = RunPosition()
    try:
        return _train(
            args,
            accelerator,
            model,
            train_dataset,
            collator,
            compute_loss,
            save_final,
            project_name,
            run_config,
            sharding_plan,
            position,
        )
    except RuntimeError as error:
        # another process died or hung: one line naming the step and the checkpoint to resume from
        failure = collective_failure(
            error,
            last_checkpoint=last_complete_checkpoint(args.output_dir),
            ddp_timeout=args.ddp_timeout,
            rank=accelerator.process_index,
            num_processes=accelerator.num_processes,
            position=position,
        )
        if failure is None:
            raise
        raise failure from error
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
    sharding_plan: ShardingPlan | None,
    position: RunPosition,
) -> TrainingResult:
    """`train` once the output folder is locked: set up, train to the last step, save; `position` follows the
    run's state, for the message of a failed collective."""
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    run, state = _set_up(
        args, accelerator, model, train_dataset, collator, compute_loss, project_name, run_config, sharding_plan
    )
    position.state, position.max_train_steps = state, run.max_train_steps
    with _Preemption() as preemption:
        with run.progress_bar:
            while state.global_step < run.max_train_steps:
                _train_epoch(run, state, preemption)
        _save_final(run, state, save_final)
        if any_process(accelerator, preemption.requested):
            _exit_on_sigterm(
                accelerator, "SIGTERM received during the final save: the final model was written whole, exiting."
            )
    if accelerator.is_main_process and args.push_to_hub:
        _push_to_hub(args, accelerator)
    accelerator.end_training()
    if run.skipped.num_skipped:
        accelerator.print(run.skipped.summary())
    return TrainingResult(
        state.global_step, state.log_history, int(state.bad_steps), run.skipped.num_skipped, args.output_dir
    )


def _set_up(
    args: PreTrainingArguments,
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_dataset,
    collator: Callable,
    compute_loss: Callable,
    project_name: str,
    run_config: dict | None,
    sharding_plan: ShardingPlan | None = None,
) -> tuple[_Run, TrainingState]:
    """Everything before the first step: data, optimizer, schedule, `accelerator.prepare`, resume, trackers, banner.

    With FSDP the model is sharded here, before the optimizer is built over its shards; Accelerate then prepares
    only the data and the schedule (it would wrap the model in DDP, and its `save_state` cannot hold shards).
    """
    streaming = not hasattr(train_dataset, "__len__")
    sharded = None
    if fsdp_enabled():
        if sharding_plan is None:
            raise ValueError("FSDP: this program does not say how its model is sharded (no sharding plan).")
        sharded = shard_model(model, sharding_plan, accelerator.device)
    dataloader, seeded_dataset = build_dataloader(args, train_dataset, collator)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    learning_rate = args.learning_rate * global_batch / 256
    optimizer = build_adamw(model, learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2))
    max_train_steps, steps_per_epoch = _count_steps(args, train_dataset, accelerator.num_processes)
    scheduler = build_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps(max_train_steps),
        num_training_steps=max_train_steps,
    )
    model, optimizer, dataloader, scheduler = _prepare(
        accelerator, model, optimizer, dataloader, scheduler, sharded=sharded is not None, streaming=streaming
    )
    skipped = SkippedImageTracker(max_skipped_fraction=args.max_skipped_fraction)
    accelerator.register_for_checkpointing(skipped)
    window = LogWindow(accelerator.device)
    num_examples = None if streaming else len(train_dataset)
    plan = {
        "global_batch_size": global_batch,
        "seed": args.seed,
        "num_examples": num_examples,
        "max_train_steps": max_train_steps,
        "num_warmup_steps": args.warmup_steps(max_train_steps),
        "lr_scheduler_type": str(args.lr_scheduler_type),
        "learning_rate": learning_rate,
    }
    state = _restore(args, accelerator, window, plan, None if sharded is None else (model, optimizer))
    _start_tracking(args, accelerator, project_name, run_config)
    accelerator.print(start_banner(accelerator, args, num_examples, max_train_steps, steps_per_epoch))
    progress_bar = tqdm(
        total=max_train_steps,
        initial=state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="Training",
    )
    run = _Run(
        args=args,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sharded=sharded,
        dataloader=dataloader,
        train_dataset=train_dataset,
        seeded_dataset=seeded_dataset,
        compute_loss=compute_loss,
        max_train_steps=max_train_steps,
        skipped=skipped,
        window=window,
        progress_bar=progress_bar,
    )
    return run, state


def _prepare(
    accelerator: Accelerator, model, optimizer, dataloader, scheduler, sharded: bool, streaming: bool
) -> tuple:
    """`accelerator.prepare` on what it may wrap: everything, but neither a sharded model and its optimizer nor a
    stream's loader; returns the model, optimizer, loader and schedule to train with."""
    if sharded:
        # the sharded model and its optimizer stay outside Accelerate (a stream's loader too, as below)
        if streaming:
            scheduler = accelerator.prepare(scheduler)
        else:
            dataloader, scheduler = accelerator.prepare(dataloader, scheduler)
    elif streaming:
        # A streaming dataset is already sharded per process (`shard_for_process`); Accelerate must not shard it
        # again or dispatch it from the main process, so only the batches' device placement is done here.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    return model, optimizer, dataloader, scheduler


def _start_tracking(
    args: PreTrainingArguments, accelerator: Accelerator, project_name: str, run_config: dict | None
) -> None:
    """Starts the tracker (main process) with the run's settings and `run_facts` as its hyper-parameters; a token
    among them is masked (`mask_secrets`): TensorBoard writes them to `hparams.yml` and to its events file."""
    run_config = {**(run_config or asdict(args)), **run_facts(accelerator)}
    if accelerator.is_main_process and accelerator.log_with:
        # tracker hyper-parameters must be scalars; masked after `str`, which may spell out a token inside an object
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_config.items()}
        accelerator.init_trackers(project_name, config=mask_secrets(config))


def _restore(
    args: PreTrainingArguments,
    accelerator: Accelerator,
    window: LogWindow,
    plan: dict,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> TrainingState:
    """A fresh state, or that of the checkpoint `--resume_from_checkpoint` finds, whose logging window goes back
    into `window` (the prepared objects, and with FSDP the sharded model and optimizer, are loaded by
    `checkpointing.resume`). `plan` is what this run will do; a checkpoint of a run with another global batch or data
    is refused (`check_resumable`)."""
    saved = None
    if args.resume_from_checkpoint:
        saved = resume(accelerator, args.output_dir, args.resume_from_checkpoint, sharded)
    if saved is not None:
        check_resumable(saved.get("run_plan"), plan, accelerator)
    if saved is not None and saved.get("log_window") is not None:  # older checkpoints have none
        window.load_state_dict(saved["log_window"], accelerator.is_main_process)
    state = TrainingState.from_checkpoint(saved, accelerator.device)
    state.run_plan = plan
    return state


class ResumeMismatchError(MimCoError):
    """A checkpoint that this run's settings would continue differently from how it was trained."""


# What must match for a resumed run to continue as the one that wrote the checkpoint: the global batch (with the
# per-image seeds, the data each step sees), the seed and the data (the order of the images).
_SAME_DATA = ("global_batch_size", "seed", "num_examples")
_SAME_SCHEDULE = ("max_train_steps", "num_warmup_steps", "lr_scheduler_type", "learning_rate")


def check_resumable(saved_plan: dict | None, plan: dict, accelerator: Accelerator) -> None:
    """Refuses a resume that would change the global batch or the data order, in one line naming what differs;
    warns when the schedule changes (a run extended with a larger `--max_train_steps` continues on the new
    schedule from the step it stopped at). Any number of processes may resume, given the same global batch."""
    if saved_plan is None:  # checkpoints of older versions did not record their plan
        return
    differences = [
        f"{key} {saved_plan.get(key)} -> {plan[key]}" for key in _SAME_DATA if saved_plan.get(key) != plan[key]
    ]
    if differences:
        raise ResumeMismatchError(
            f"--resume_from_checkpoint: this run would not continue the checkpoint's ({', '.join(differences)}). "
            f"Resume with a global batch of {saved_plan.get('global_batch_size')} (per-device batch x processes x "
            "accumulation), the same --seed and data, or start in a new --output_dir."
        )
    changed = [
        f"{key} {saved_plan.get(key)} -> {plan[key]}" for key in _SAME_SCHEDULE if saved_plan.get(key) != plan[key]
    ]
    if changed:
        logger.warning(
            "Resuming on another schedule (%s): the run continues from the checkpoint's step on the new one.",
            ", ".join(changed),
        )


def _train_epoch(run: _Run, state: TrainingState, preemption: _Preemption) -> None:
    """The rest of the current epoch, or up to the run's last step; a finished epoch moves the state to the next."""
    for batch in _epoch_batches(run, state):
        if not _train_on_batch(run, state, batch):
            continue
        _finish_optimizer_step(run, state, preemption)
        if state.global_step >= run.max_train_steps:
            return
    state.epoch += 1
    state.batches_done_in_epoch = 0


def _epoch_batches(run: _Run, state: TrainingState) -> Iterator[dict]:
    """The current epoch's batches on the device, from the first one the run has not trained on yet."""
    if run.seeded_dataset is None:
        device = run.accelerator.device
        batches = stream_batches(
            run.dataloader, run.train_dataset, run.args.seed, state.epoch, state.batches_done_in_epoch
        )
        for batch in batches:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return
    run.seeded_dataset.epoch = state.epoch
    run.dataloader.set_epoch(state.epoch)
    if state.batches_done_in_epoch > 0:
        yield from run.accelerator.skip_first_batches(run.dataloader, state.batches_done_in_epoch)
    else:
        yield from run.dataloader


def _train_on_batch(run: _Run, state: TrainingState, batch: dict) -> bool:
    """Forward and backward on one micro-batch and, at the end of an accumulation, the optimizer step. Returns
    whether an optimizer step was taken."""
    accelerator = run.accelerator
    state.batches_done_in_epoch += 1
    # A batch whose images were all unreadable is skipped; every process must agree, or the gradient all-reduce
    # would wait forever.
    if any_process(accelerator, run.window.add_batch(batch) == 0):
        return False
    with accelerator.accumulate(run.model):
        if run.sharded is None:
            loss, parts = run.compute_loss(run.model, batch, state.global_step / run.max_train_steps)
        else:
            # the sharded model was not prepared by Accelerate, which would have put its forward under autocast
            with accelerator.autocast():
                loss, parts = run.compute_loss(run.model, batch, state.global_step / run.max_train_steps)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            _clip_and_check_gradient(run, state)
        if run.sharded is None or accelerator.sync_gradients:
            # Accelerate's optimizer wrapper waits for the end of an accumulation itself; the sharded one does not
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    # a step with a NaN/Inf loss is skipped, and kept out of the logged averages as well
    run.window.add_step(loss, parts)
    return accelerator.sync_gradients


def _clip_and_check_gradient(run: _Run, state: TrainingState) -> None:
    """Clips the gradient; where its norm is NaN/Inf, turns the coming optimizer step into a no-op and counts it."""
    # The global gradient norm is identical on every process, so its finiteness decides the skip everywhere without
    # another collective; a NaN/Inf loss makes it non-finite too.
    max_norm = run.args.max_grad_norm if run.args.max_grad_norm > 0 else math.inf
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    if not isinstance(grad_norm, torch.Tensor):  # DeepSpeed clips inside its own step
        grad_norm = torch.tensor(float(grad_norm or 0.0), device=run.accelerator.device)
    grad_norm = full_tensor(grad_norm)  # with FSDP, the norm of sharded gradients is a DTensor reduced over processes
    bad = ~torch.isfinite(grad_norm)
    skip_update_if(run.optimizer, bad, run.accelerator)
    state.bad_steps += bad.long()
    state.consecutive_bad_steps = (state.consecutive_bad_steps + 1) * bad.long()
    state.grad_norm = grad_norm


def _finish_optimizer_step(run: _Run, state: TrainingState, preemption: _Preemption) -> None:
    """After an optimizer step: the schedule, the log at logging steps, a checkpoint when due or on SIGTERM."""
    args, accelerator = run.args, run.accelerator
    run.scheduler.step()
    state.global_step += 1
    run.progress_bar.update(1)
    if state.global_step % args.logging_steps == 0 or state.global_step == run.max_train_steps:
        # `.item()` synchronises with the device, so it only happens at logging steps.
        _log_step(run, state)
        _stop_if_diverged(args, state)
    stop = any_process(accelerator, preemption.requested)
    if (args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0) or stop:
        trainer_state = state.to_checkpoint(run.window, accelerator)
        folder = save_checkpoint(
            accelerator,
            args.output_dir,
            state.global_step,
            trainer_state,
            args.checkpoints_total_limit,
            sharded=None if run.sharded is None else (run.model, run.optimizer),
        )
        accelerator.print(f"Saved checkpoint {folder}")
    if stop:
        _exit_on_sigterm(accelerator, "SIGTERM received: checkpoint written, exiting.")


def _log_step(run: _Run, state: TrainingState) -> None:
    """Ends the logging window: one record in the history, the tracker and the progress bar, one printed line."""
    lr = run.scheduler.get_last_lr()[0]
    record = run.window.record(run.accelerator, state.global_step, lr, state.grad_norm, run.skipped)
    state.log_history.append(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.global_step)
    if "loss" in record:
        run.progress_bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if run.accelerator.is_main_process:
        run.progress_bar.write(format_log_record(record, run.max_train_steps))
    run.window.reset()


def _stop_if_diverged(args: PreTrainingArguments, state: TrainingState) -> None:
    consecutive_bad_steps = int(state.consecutive_bad_steps)
    if consecutive_bad_steps >= args.max_consecutive_bad_steps:
        raise TrainingDivergedError(
            f"{consecutive_bad_steps} consecutive steps had a NaN/Inf loss or gradient (up to step "
            f"{state.global_step}); stopping. Lower --learning_rate, use bf16 instead of fp16, or check the "
            "data. The last checkpoint is intact."
        )


def _save_final(run: _Run, state: TrainingState, save_final: Callable[[torch.nn.Module, str], None]) -> None:
    """Once every process is done: the final model and `train_results.json`, written by the main process."""
    bad_steps = int(state.bad_steps)
    memory = state_bytes(run.model, run.optimizer)  # before the gather: what training held
    run.accelerator.wait_for_everyone()
    if run.sharded is not None:
        # every process sends its shards; the main process gets the whole model, as a DDP run has it
        final_model = gather_for_saving(run.sharded, run.accelerator)
    else:
        final_model = run.accelerator.unwrap_model(run.model)
    if not run.accelerator.is_main_process:
        return
    # still under the SIGTERM handler: a SIGTERM now lets the final model be written whole first
    save_final_atomically(save_final, final_model, run.args.output_dir)
    write_json_atomically(
        os.path.join(run.args.output_dir, "train_results.json"),
        {
            "global_step": state.global_step,
            "bad_steps": bad_steps,
            "skipped_images": run.skipped.num_skipped,
            **run_facts(run.accelerator),
            "state_bytes_per_process": memory,
            "log_history": state.log_history,
        },
    )


def _push_to_hub(args: PreTrainingArguments, accelerator: Accelerator) -> None:
    from modeling_mimco.hub.upload import (
        push_to_hub,  # the one checked upload path: model card, file list, secret check
    )

    push_to_hub(
        args.output_dir,
        args.hub_model_id,
        token=args.hub_token,
        private=args.hub_private_repo,
        commit_message="Upload MimCo pre-training output",
        log=accelerator.print,
    )


__all__ = [
    "SeededBatches",
    "TrainingDivergedError",
    "TrainingResult",
    "build_dataloader",
    "create_accelerator",
    "only_batch",
    "sample_seed",
    "stream_batches",
    "stream_seed",
    "train",
]
