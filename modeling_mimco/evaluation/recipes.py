"""The training defaults of the two `Trainer` recipes, where transformers' `TrainingArguments` defaults differ.

One source for each recipe: the field defaults of `evaluation.finetuning.FineTuningArguments` (`mimco-finetune`)
and `SegmentationTrainingArguments` (`mimco-segment`) read these dicts, and each command's `--help` lists them
without importing transformers' `training_args` (which imports torch). This module imports nothing.
"""

from __future__ import annotations


FINETUNING_TRAINING_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "num_train_epochs": 100.0,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "label_smoothing_factor": 0.1,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 50,
    "remove_unused_columns": False,
    "do_train": True,
    "do_eval": True,
}
"""`mimco-finetune`: the BEiT / MAE fine-tuning recipe (AdamW, cosine schedule with 5% warmup, label smoothing)."""

SEGMENTATION_TRAINING_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-4,
    "weight_decay": 0.05,
    "lr_scheduler_type": "linear",
    "warmup_steps": 1500,
    "max_steps": 160_000,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "eval_strategy": "steps",
    "eval_steps": 16_000,
    "save_strategy": "steps",
    "save_steps": 16_000,
    "save_total_limit": 2,
    "logging_steps": 50,
    "batch_eval_metrics": True,
    "remove_unused_columns": False,
    "do_train": True,
    "do_eval": False,
}
"""`mimco-segment`: the paper-scale ADE20K UperNet recipe (160k iterations of batch 16 on 8 GPUs, AdamW lr 1e-4)."""


__all__ = ["FINETUNING_TRAINING_DEFAULTS", "SEGMENTATION_TRAINING_DEFAULTS"]
