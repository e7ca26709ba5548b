"""The GPU check's command-line arguments: `GpuCheckArguments`, its checks, and the defaults of the full and the
smoke run (sizes, time budgets, the device). Imports torch and the presets of `configuration_mimco`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from modeling_mimco.configuration_mimco import MODEL_PRESETS


PARTS = ("environment", "correctness", "throughput", "data", "reproduce")
# modeling_mimco/benchmarks/gpu_check/arguments.py -> the clone's root; its CIFAR-10 copy lies beside it
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_CIFAR10 = os.path.join(REPO_ROOT, "..", "shared", "datasets", "cifar10")

# seconds of each part: 7 min 40 s in all; with the process's start and a compilation's overrun the run stays
# within 8 minutes. The reproduction has the largest share: its table (3 seeds, 6 rows, fine-tunes) is the figure no
# CPU run can give. The smoke run's reproduction rehearses the same design at tiny sizes, 2 seeds (about 70 s here).
DEFAULT_BUDGETS = {"environment": 10, "correctness": 50, "throughput": 130, "data": 35, "reproduce": 235}
SMOKE_BUDGETS = {"environment": 4, "correctness": 20, "throughput": 25, "data": 8, "reproduce": 150}


@dataclass
class GpuCheckArguments:
    """What the GPU check runs, where and for how long; the sizes and budgets left as None get the defaults of the
    full run, or of the smoke run (tiny sizes on the CPU) with `--smoke`."""

    output_dir: str = field(default=os.path.join("outputs", "gpu_check"), metadata={"help": "Where the report goes."})
    smoke: bool = field(
        default=False, metadata={"help": "Every part on the CPU at tiny sizes in under 2 minutes (for CI)."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda or cpu; default cuda when available."})
    parts: str = field(default=",".join(PARTS), metadata={"help": f"Comma-separated subset of {', '.join(PARTS)}."})
    max_minutes: float = field(default=8.0, metadata={"help": "Wall-time limit of the whole run (4 with --smoke)."})
    budget_environment: float | None = field(default=None, metadata={"help": "Seconds (default 10; smoke 4)."})
    budget_correctness: float | None = field(default=None, metadata={"help": "Seconds (default 50; smoke 20)."})
    budget_throughput: float | None = field(default=None, metadata={"help": "Seconds (default 130; smoke 25)."})
    budget_data: float | None = field(default=None, metadata={"help": "Seconds (default 35; smoke 8)."})
    budget_reproduce: float | None = field(default=None, metadata={"help": "Seconds (default 235; smoke 150)."})
    model_preset: str = field(default="vit-small-patch16", metadata={"help": "Throughput shape (smoke: tiny)."})
    batch_size: int | None = field(default=None, metadata={"help": "Throughput batch (default 128; smoke 8)."})
    max_batch_size: int | None = field(
        default=None, metadata={"help": "Largest batch the doubling tries (default 8192; smoke 2x --batch_size)."}
    )
    compile_backend: str | None = field(
        default=None,
        metadata={
            "help": "torch.compile backend (default inductor; smoke aot_eager: the same graph capture and autograd "
            "tracing without inductor's code generation, which takes a minute on a small CPU)."
        },
    )
    compile_presets: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated presets whose whole stage-2 model is compiled and timed eager / compiled / "
            "reduce-overhead (default vit-small-patch16,vit-base-patch16; smoke: tiny)."
        },
    )
    gemm_size: int | None = field(default=None, metadata={"help": "Side of the GEMMs (default 8192; smoke 256)."})
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: the CPU cores)."})
    dataset_dir: str | None = field(
        default=None, metadata={"help": "CIFAR-10 for the reproduce part (default ../shared/datasets/cifar10)."}
    )
    seed: int = field(default=0)

    def __post_init__(self):
        self._check_values()
        if self.smoke:
            self._use_smoke_sizes()
        self._choose_device()
        self._fill_defaults()

    def part_list(self) -> list[str]:
        return [part.strip() for part in self.parts.split(",") if part.strip()]

    def _check_values(self) -> None:
        unknown = sorted(set(self.part_list()) - set(PARTS))
        if unknown:
            raise ValueError(f"--parts: unknown parts {unknown}; known: {list(PARTS)}.")
        if self.device not in (None, "cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}.")
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"--model_preset must be one of {sorted(MODEL_PRESETS)}, got {self.model_preset!r}.")
        for name in ("batch_size", "max_batch_size", "gemm_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}.")
        if self.max_minutes <= 0:
            raise ValueError(f"--max_minutes must be positive, got {self.max_minutes}.")

    def _use_smoke_sizes(self) -> None:
        # the smoke run is the CPU rehearsal: tiny sizes and short budgets, whatever the machine has
        self.device = "cpu"
        self.max_minutes = min(self.max_minutes, 4.0)
        self.model_preset = "tiny"
        self.batch_size = self.batch_size or 8
        self.max_batch_size = self.max_batch_size or 2 * self.batch_size
        self.compile_backend = self.compile_backend or "aot_eager"
        self.compile_presets = self.compile_presets or "tiny"
        self.gemm_size = self.gemm_size or 256

    def _choose_device(self) -> None:
        if self.device is None and not torch.cuda.is_available():
            # full sizes on a CPU would take hours (one ViT-S step of batch 128 is about a minute)
            raise ValueError(
                "no CUDA device: run with --smoke for the CPU rehearsal (tiny sizes), or pass --device cpu to run "
                "the full sizes on the CPU anyway."
            )
        self.device = self.device or "cuda"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available.")

    def _fill_defaults(self) -> None:
        self.batch_size = self.batch_size or 128
        self.max_batch_size = self.max_batch_size or 8192
        self.compile_backend = self.compile_backend or "inductor"
        self.compile_presets = self.compile_presets or "vit-small-patch16,vit-base-patch16"
        self.gemm_size = self.gemm_size or 8192
        if self.num_workers is None:
            self.num_workers = os.cpu_count() or 1
        self.dataset_dir = self.dataset_dir or os.path.normpath(DEFAULT_CIFAR10)
        budgets = SMOKE_BUDGETS if self.smoke else DEFAULT_BUDGETS
        for part in PARTS:
            if getattr(self, f"budget_{part}") is None:
                setattr(self, f"budget_{part}", float(budgets[part]))


__all__ = ["PARTS", "REPO_ROOT", "GpuCheckArguments"]
