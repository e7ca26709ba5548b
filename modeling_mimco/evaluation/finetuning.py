"""The fine-tuning recipe for image classification with `transformers.Trainer` (BEiT / MAE style).

This module owns the parts of the recipe that the `Trainer` does not have: `SoftTargetCrossEntropy` (the loss for
`compute_loss_func`: cross-entropy against hard or MixUp / CutMix soft targets, with label smoothing),
`build_batch_mixer` (MixUp / CutMix of a training batch) and `FineTuningTrainer` (a `Trainer` whose optimizer uses
the layer-wise learning-rate decay groups of `optimization.layer_decay_parameter_groups` and whose training steps,
never its evaluation steps, mix their batches). `mimco-finetune` (`commands/run_finetuning.py`) puts them together.
`trainer_arguments` is the copy of the arguments that such a `Trainer` gets (no upload, no token), and
`CpuProcessGroupTimeout` makes their `--ddp_timeout` hold for processes on CPUs. `FineTuningArguments` and
`SegmentationTrainingArguments` are the `TrainingArguments` of `mimco-finetune` and `mimco-segment`, with their
recipes' defaults (`recipes`, which their `--help` lists without importing this module), and
`ClassificationCollator` batches `mimco-finetune`'s images. It imports torch, torchvision, transformers, accelerate
and `optimization`, `log` and `data.pipeline` of this package; the commands import it only when the work starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch import nn
from torchvision.transforms import v2
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modeling_mimco.data.pipeline import MimCoPretrainingCollator
from modeling_mimco.evaluation.recipes import FINETUNING_TRAINING_DEFAULTS, SEGMENTATION_TRAINING_DEFAULTS
from modeling_mimco.training.failures import RunPosition, collective_failure
from modeling_mimco.training.log import without_secrets
from modeling_mimco.training.optimization import layer_decay_parameter_groups


class SoftTargetCrossEntropy:
    """The fine-tuning loss, as the Trainer's `compute_loss_func(outputs, labels, num_items_in_batch)`.

    `labels` are class indices `(B,)` (entries of -100 are ignored) or, after MixUp / CutMix, class probabilities
    `(B, C)`. Targets are smoothed to `(1 - label_smoothing) * target + label_smoothing / C` and the loss is
    `-sum(target * log_softmax(logits))`, summed over the examples and divided by `num_items_in_batch` when the
    Trainer gives it (gradient accumulation), else averaged.
    """

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must lie in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits.float()
        num_classes = logits.shape[-1]
        if labels.dtype.is_floating_point:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Soft labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}."
                )
            targets, valid = labels.float(), torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        else:
            valid = labels != -100
            targets = nn.functional.one_hot(labels.clamp(min=0), num_classes).float()
        if self.label_smoothing > 0:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        per_example = -(targets * nn.functional.log_softmax(logits, dim=-1)).sum(dim=-1)
        per_example = per_example * valid
        if num_items_in_batch is not None:
            return per_example.sum() / num_items_in_batch
        return per_example.sum() / valid.sum().clamp(min=1)


def build_batch_mixer(
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp / CutMix of a training batch with `torchvision.transforms.v2`, or `None` when both alphas are 0.

    With both enabled, each batch gets CutMix with probability `switch_prob`, else MixUp; the whole step happens with
    probability `prob`. The returned callable maps `(pixel_values, labels)` with integer labels `(B,)` to mixed images
    and soft labels `(B, num_classes)` (integer labels when the step is skipped).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"MixUp / CutMix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}.")
    if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"Probabilities must lie in [0, 1], got prob={prob}, switch_prob={switch_prob}.")
    mixers = []
    if mixup_alpha > 0:
        mixers.append((v2.MixUp(alpha=mixup_alpha, num_classes=num_classes), 1.0 - switch_prob))
    if cutmix_alpha > 0:
        mixers.append((v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes), switch_prob))
    if not mixers or prob == 0:
        return None
    if len(mixers) == 1:
        mixer = mixers[0][0]
    else:
        mixer = v2.RandomChoice([m for m, _ in mixers], p=[p for _, p in mixers])
    return mixer if prob >= 1.0 else v2.RandomApply([mixer], p=prob)


class FineTuningTrainer(Trainer):
    """`transformers.Trainer` with the fine-tuning recipe's optimizer groups and batch mixing.

    Args:
        layer_decay: Layer-wise learning-rate decay (`layer_decay_parameter_groups`); 1.0 disables the decay but keeps
            the recipe's weight-decay exclusions.
        batch_mixer: Applied to `(pixel_values, labels)` of every training batch (`build_batch_mixer`); evaluation
            batches are never mixed. Pair it with `compute_loss_func=SoftTargetCrossEntropy(...)`.

    The optimizer class and its other settings (`--optim`, betas, epsilon) still come from `TrainingArguments`.
    """

    def __init__(self, *args, layer_decay: float = 0.65, batch_mixer: Callable | None = None, **kwargs):
        self.layer_decay = layer_decay
        self.batch_mixer = batch_mixer
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        if any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict")):
            raise ValueError(f"--optim {self.args.optim} builds its own parameter groups; it cannot use layer decay.")
        groups = layer_decay_parameter_groups(
            opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_decay
        )
        for group in groups:
            group.pop("param_names")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def train(self, *args, **kwargs):
        """`Trainer.train`, except that a collective whose peer died or hung (`--ddp_timeout`) ends the run with the
        one-line `ProcessGroupFailure` of the pre-training commands, naming the step and the checkpoint to resume
        from, instead of a traceback from inside torch."""
        try:
            return super().train(*args, **kwargs)
        except RuntimeError as error:
            last_checkpoint = (
                get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            )
            failure = collective_failure(
                error,
                last_checkpoint=last_checkpoint,
                ddp_timeout=self.args.ddp_timeout,
                rank=self.args.process_index,
                num_processes=self.args.world_size,
                position=RunPosition(state=self.state, max_train_steps=self.state.max_steps),
                resume_flag=f"--resume_from_checkpoint {last_checkpoint}" if last_checkpoint else "no change",
            )
            if failure is None:
                raise
            raise failure from error

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.batch_mixer is not None and inputs.get("labels") is not None and len(inputs["labels"]) > 0:
            inputs = dict(inputs)
            inputs["pixel_values"], inputs["labels"] = self.batch_mixer(inputs["pixel_values"], inputs["labels"])
        return super().training_step(model, inputs, num_items_in_batch)


def trainer_arguments(training_args):
    """The copy of a command's `TrainingArguments` that its `Trainer` gets: `push_to_hub` off (the command uploads
    once, at the end, through `push_trainer_output`) and no token (`training.log.without_secrets`), since the
    `Trainer` pickles its arguments into `training_args.bin` in the output folder and in every checkpoint. The
    command's own arguments keep the token for that upload."""
    trainer_args = without_secrets(training_args)
    trainer_args.push_to_hub = False
    return trainer_args


def push_trainer_output(trainer: Trainer, training_args, dataset: str, eval_split: str, commit_message: str) -> None:
    """Uploads a Trainer command's output folder in one commit through the package's checked path
    (`hub.upload.push_to_hub`: model card, file list, secret check), from the main process; the card gets the eval
    results on `dataset` / `eval_split` when they were measured. Called on every process."""
    import os

    from modeling_mimco.hub.model_card import load_results
    from modeling_mimco.hub.upload import push_to_hub

    output_dir = training_args.output_dir
    if not training_args.do_train:
        trainer.save_model()  # the model to upload: the one that was evaluated
    if not trainer.is_world_process_zero():
        return
    results = None
    if training_args.do_eval:
        results = load_results(
            os.path.join(output_dir, "eval_results.json"), dataset=dataset, dataset_split=eval_split
        )
    push_to_hub(
        output_dir,
        training_args.hub_model_id,
        token=training_args.hub_token,
        private=bool(training_args.hub_private_repo),
        commit_message=commit_message,
        revision=training_args.hub_revision,
        results=results,
    )


class CpuProcessGroupTimeout:
    """Put before `TrainingArguments` in a subclass's bases: `--ddp_timeout` then holds for processes on CPUs too.

    transformers hands `ddp_timeout` to the process group only when it sets up GPUs; processes on CPUs (`--use_cpu`,
    or `ACCELERATE_USE_CPU=1 accelerate launch`) get torch's default of 30 minutes whatever the flag says. So the
    gloo group of such a launch is created here, before transformers sets up its devices, with the flag's timeout;
    transformers then finds it and trains in it.

    It also turns `--dataloader_pin_memory` off on a machine without an accelerator (or with `--use_cpu`), where
    pinned memory serves nothing and torch warns about it once per DataLoader, and, unless `--disable_tqdm` is
    given, the progress bars off where stderr is no terminal (a log file): the evaluation bar nested in the
    training bar writes cursor-movement escape codes there. The logged metrics are printed as plain lines instead.
    """

    def __post_init__(self):
        on_cpus = self.use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
        if on_cpus and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            PartialState(cpu=True, backend=self.ddp_backend, timeout=timedelta(seconds=self.ddp_timeout))
        if self.dataloader_pin_memory and (on_cpus or not has_accelerator()):
            self.dataloader_pin_memory = False
        if self.disable_tqdm is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            self.disable_tqdm = True
        super().__post_init__()


def has_accelerator() -> bool:
    """Whether torch sees a device that pinned host memory speeds up (the check behind its pin_memory warning)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


_FINETUNING = FINETUNING_TRAINING_DEFAULTS
_SEGMENTATION = SEGMENTATION_TRAINING_DEFAULTS


@dataclass
class FineTuningArguments(CpuProcessGroupTimeout, TrainingArguments):
    """`TrainingArguments` with the fine-tuning recipe's defaults (`recipes.FINETUNING_TRAINING_DEFAULTS`; every
    other flag as in transformers; its `--ddp_timeout` holds on CPUs too)."""

    learning_rate: float = field(
        default=_FINETUNING["learning_rate"], metadata={"help": "Peak learning rate of the head (AdamW)."}
    )
    weight_decay: float = field(
        default=_FINETUNING["weight_decay"], metadata={"help": "AdamW weight decay (not on norms, biases, tokens)."}
    )
    lr_scheduler_type: str = field(default=_FINETUNING["lr_scheduler_type"])
    warmup_steps: float = field(
        default=_FINETUNING["warmup_steps"], metadata={"help": "Warmup steps, or a fraction of all steps if < 1."}
    )
    num_train_epochs: float = field(default=_FINETUNING["num_train_epochs"])
    per_device_train_batch_size: int = field(default=_FINETUNING["per_device_train_batch_size"])
    per_device_eval_batch_size: int = field(default=_FINETUNING["per_device_eval_batch_size"])
    label_smoothing_factor: float = field(
        default=_FINETUNING["label_smoothing_factor"], metadata={"help": "Label smoothing of the training loss."}
    )
    eval_strategy: str = field(default=_FINETUNING["eval_strategy"])
    save_strategy: str = field(default=_FINETUNING["save_strategy"])
    save_total_limit: int | None = field(default=_FINETUNING["save_total_limit"])
    logging_steps: float = field(default=_FINETUNING["logging_steps"])
    remove_unused_columns: bool = field(
        default=_FINETUNING["remove_unused_columns"],
        metadata={"help": "Must stay False: the image column is decoded on the fly."},
    )
    do_train: bool = field(default=_FINETUNING["do_train"])
    do_eval: bool = field(default=_FINETUNING["do_eval"])


@dataclass
class SegmentationTrainingArguments(CpuProcessGroupTimeout, TrainingArguments):
    """`TrainingArguments` with the ADE20K UperNet recipe's defaults (`recipes.SEGMENTATION_TRAINING_DEFAULTS`;
    every other flag as in transformers; its `--ddp_timeout` holds on CPUs too)."""

    learning_rate: float = field(
        default=_SEGMENTATION["learning_rate"], metadata={"help": "Peak learning rate of the head (AdamW)."}
    )
    weight_decay: float = field(
        default=_SEGMENTATION["weight_decay"], metadata={"help": "AdamW weight decay (not on norms, biases, tokens)."}
    )
    lr_scheduler_type: str = field(default=_SEGMENTATION["lr_scheduler_type"])
    warmup_steps: float = field(
        default=_SEGMENTATION["warmup_steps"], metadata={"help": "Warmup steps, or a fraction of all steps if < 1."}
    )
    max_steps: int = field(default=_SEGMENTATION["max_steps"])
    per_device_train_batch_size: int = field(
        default=_SEGMENTATION["per_device_train_batch_size"], metadata={"help": "2 per GPU on 8 GPUs: batch 16."}
    )
    per_device_eval_batch_size: int = field(default=_SEGMENTATION["per_device_eval_batch_size"])
    eval_strategy: str = field(default=_SEGMENTATION["eval_strategy"])
    eval_steps: float | None = field(default=_SEGMENTATION["eval_steps"])
    save_strategy: str = field(default=_SEGMENTATION["save_strategy"])
    save_steps: float = field(default=_SEGMENTATION["save_steps"])
    save_total_limit: int | None = field(default=_SEGMENTATION["save_total_limit"])
    logging_steps: float = field(default=_SEGMENTATION["logging_steps"])
    batch_eval_metrics: bool = field(
        default=_SEGMENTATION["batch_eval_metrics"],
        metadata={"help": "Accumulate the IoU per batch, instead of keeping every predicted mask."},
    )
    remove_unused_columns: bool = field(
        default=_SEGMENTATION["remove_unused_columns"],
        metadata={"help": "Must stay False: images and masks are decoded on the fly."},
    )
    do_train: bool = field(default=_SEGMENTATION["do_train"])
    do_eval: bool = field(
        default=_SEGMENTATION["do_eval"],
        metadata={
            "help": "Evaluate at the end; on by default with an --eval_strategy other than 'no' (as in "
            "transformers), so --eval_strategy no evaluates nothing unless --do_eval is given."
        },
    )


class ClassificationCollator(MimCoPretrainingCollator):
    """Stacks `pixel_values` and `labels`, dropping unreadable images (without a mask, without the skip count)."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch.pop("num_skipped", None)
        return batch


__all__ = [
    "ClassificationCollator",
    "CpuProcessGroupTimeout",
    "FineTuningArguments",
    "FineTuningTrainer",
    "SegmentationTrainingArguments",
    "SoftTargetCrossEntropy",
    "build_batch_mixer",
    "has_accelerator",
    "push_trainer_output",
    "trainer_arguments",
]
