"""The command-line settings of the pre-training loop, as `HfArgumentParser` reads them: optimisation, schedule,
precision, logging, checkpoints, resume, bad-step and unreadable-image limits, and the Hub upload.

Like transformers' `training_args.py`, it only holds and checks the settings: a bad value is a `ValueError` that
names its flag, raised when the arguments are built. It imports only the standard library, so that a command prints
`--help` and rejects an unknown flag without loading torch; `checkpointing` (to verify the checkpoint
`--resume_from_checkpoint` names) and transformers' `SchedulerType` are imported when the arguments are checked.
`training` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# torch.compile's modes, by the names transformers' TrainingArguments gives them
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
        default=False,
        metadata={"help": "Compile the whole model with torch.compile (stage 2: one graph, no graph breaks)."},
    )
    torch_compile_mode: str | None = field(
        default=None,
        metadata={
            "help": f"torch.compile's mode, one of {list(TORCH_COMPILE_MODES)} (as transformers' TrainingArguments); "
            "setting it turns --torch_compile on. 'reduce-overhead' replays CUDA graphs on a GPU."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a process waits in a collective for the others (as transformers' TrainingArguments): "
            "when one hangs or is stopped, the rest stop after this long with one line naming the last checkpoint."
        },
    )
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
        if self.torch_compile_mode is not None:
            if self.torch_compile_mode not in TORCH_COMPILE_MODES:
                raise ValueError(
                    f"--torch_compile_mode must be one of {list(TORCH_COMPILE_MODES)}, got {self.torch_compile_mode!r}."
                )
            self.torch_compile = True
        _check_positive("per_device_train_batch_size", self.per_device_train_batch_size)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("num_train_epochs", self.num_train_epochs)
        _check_positive("logging_steps", self.logging_steps)
        _check_positive("max_consecutive_bad_steps", self.max_consecutive_bad_steps)
        _check_positive("ddp_timeout", self.ddp_timeout)
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
        self._check_lr_scheduler_type()
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to must be 'tensorboard' or 'none', got {self.report_to!r}.")
        if self.with_tracking and self.report_to == "none":
            raise ValueError("--with_tracking asks for a tracker but --report_to is 'none'.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")
        if self.resume_from_checkpoint not in (None, "latest"):
            from modeling_mimco.training.checkpointing import CheckpointError, verify_checkpoint

            try:
                verify_checkpoint(self.resume_from_checkpoint)
            except CheckpointError as error:
                raise ValueError(f"--resume_from_checkpoint: {error}") from error

    def _check_lr_scheduler_type(self) -> None:
        from modeling_mimco.training.schedules import OWN_SCHEDULES

        if str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) in OWN_SCHEDULES:
            return  # known without importing transformers' Trainer utilities (and peft with them)
        from transformers import SchedulerType

        try:
            SchedulerType(self.lr_scheduler_type)
        except ValueError:
            choices = ", ".join(member.value for member in SchedulerType)
            raise ValueError(
                f"--lr_scheduler_type must be one of {choices}; got {self.lr_scheduler_type!r}."
            ) from None

    def warmup_steps(self, max_train_steps: int) -> int:
        """`--num_warmup_steps` if given, else `--warmup_ratio` of the run's optimizer steps."""
        if self.num_warmup_steps is not None:
            return self.num_warmup_steps
        return int(self.warmup_ratio * max_train_steps)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"--{name} must be positive, got {value}.")


__all__ = ["PreTrainingArguments"]
