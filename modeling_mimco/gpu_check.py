"""The GPU check kit: everything worth knowing about this package on one CUDA GPU, in one run of at most 8 minutes.

    python scripts/gpu_check.py                       # on a GPU machine: outputs/gpu_check/report.{json,md}
    python scripts/gpu_check.py --smoke               # every part on the CPU at tiny sizes, under 2 minutes

Parts, each stopped by its own time budget (`--budget_<part>` seconds) and by the run's `--max_minutes`:

- `environment`: GPU name, memory, torch/CUDA versions, bf16 support, the GPU's datasheet peaks (dense bf16, fp32
  without TF32; `modeling_mimco.benchmarking.GPU_PEAKS`) and the measured large-GEMM rate in bf16, fp32 and TF32.
- `correctness`: fp32 forward and gradients on the device equal the CPU's for `MimCoModel`, `MimCoForPreTraining`,
  `MimCoForImageClassification` and `MimCoForContrastivePreTraining`; bf16 autocast gives finite losses close to
  fp32; the fused-AdamW NaN/Inf skip (`training.build_adamw` + `training.skip_update_if`) leaves the weights and
  the step count untouched; `torch.compile` runs and agrees with eager; SDPA runs with only its fused (flash /
  memory-efficient) kernels allowed in bf16; `save_pretrained` -> `from_pretrained` is exact on the device.
- `throughput`: stage-2 and stage-1 training steps (ViT-S/16, 224 px, batch 128, bf16), eager and compiled, beside
  the stock-transformers reference step of `scripts/benchmark.py`: images/s, model FLOPs utilisation against the
  datasheet peak and against the measured GEMM rate, peak memory; gradient checkpointing's memory and speed; the
  largest batch that fits, found by doubling.
- `data`: the real stage-2 loader (`build_pretraining_transform`, `PretrainingExampleTransform`,
  `MimCoPretrainingCollator` and the training loop's seeded batches in a DataLoader with one worker per core) on
  generated 500x375 JPEGs, against the step's images/s; and GPU JPEG decoding (`torchvision.io.decode_jpeg(...,
  device="cuda")`), an opt-in path that the training scripts do not use.
- `reproduce`: a short `scripts/reproduce.py` run on CIFAR-10 (`../shared/datasets/cifar10` beside the repository
  root, or `--dataset_dir`), skipped when the data is absent.

With `--smoke` (or `--device cpu`) the parts run on the CPU: the device-vs-CPU comparisons then compare the CPU
with itself (they exercise the code, nothing more), and what needs CUDA (datasheet peaks, per-step peak memory) says
"skipped: no CUDA". Without CUDA and without either flag the kit refuses to start. The report records for every part
`status` ("ok", "failed" or "skipped"), a `reason` for a skip, its seconds and its budget, and each part's checks.

The module imports only torch, transformers, torchvision, datasets and this package, and nothing imports it: the
model files never load it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch
import transformers
from transformers import HfArgumentParser

from . import __version__
from .benchmarking import (
    ReferenceMimCo,
    StepFlops,
    autocast,
    contrastive_step_flops,
    cpu_supports_bf16,
    lookup_gpu_peak,
    make_contrastive_step,
    make_jpegs,
    make_mimco_step,
    make_reference_step,
    measure_gemm_rate,
    mimco_step_flops,
    same_loss_check,
    synchronize,
    time_interleaved,
    utilisation,
)
from .commands import reports_errors
from .configuration_mimco import MODEL_PRESETS, MimCoConfig, MimCoContrastiveConfig
from .masking import MimCoMaskGenerator
from .modeling_mimco import (
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from .optimization import build_adamw, skip_update_if


PARTS = ("environment", "correctness", "throughput", "data", "reproduce")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CIFAR10 = os.path.join(REPO_ROOT, "..", "shared", "datasets", "cifar10")
REPORT_VERSION = 1

# Tolerances of the device-vs-CPU comparison in fp32 (TF32 off): the largest absolute difference over the largest
# absolute value of the CPU's tensor (for gradients at least 1 % of the largest gradient of the model, since some are
# zero in exact arithmetic: a bias followed by batch statistics). Both sides compute the same float32 products; only
# the summation order differs. For scale: the CPU's own fp32 error against fp64 at the GPU check's shape is at most
# 1.8e-5 on outputs and 6.4e-5 on gradients (stage 1, whose batch statistics amplify rounding); the report gives it
# for every model beside the device's difference.
OUTPUT_TOLERANCE = 2e-4
GRADIENT_TOLERANCE = 1e-3
GRADIENT_FLOOR = 1e-2
# bf16 autocast against fp32 on the same device: relative difference of the loss
BF16_LOSS_TOLERANCE = 3e-2
# torch.compile against eager, fp32: relative difference of the loss and of the gradients
COMPILE_LOSS_TOLERANCE = 1e-4
COMPILE_GRADIENT_TOLERANCE = 1e-3


@dataclass
class GpuCheckArguments:
    output_dir: str = field(default=os.path.join("outputs", "gpu_check"), metadata={"help": "Where the report goes."})
    smoke: bool = field(
        default=False, metadata={"help": "Every part on the CPU at tiny sizes in under 2 minutes (for CI)."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda or cpu; default cuda when available."})
    parts: str = field(default=",".join(PARTS), metadata={"help": f"Comma-separated subset of {', '.join(PARTS)}."})
    max_minutes: float = field(default=8.0, metadata={"help": "Wall-time limit of the whole run (2 with --smoke)."})
    budget_environment: float | None = field(default=None, metadata={"help": "Seconds (default 10; smoke 4)."})
    budget_correctness: float | None = field(default=None, metadata={"help": "Seconds (default 60; smoke 20)."})
    budget_throughput: float | None = field(default=None, metadata={"help": "Seconds (default 170; smoke 25)."})
    budget_data: float | None = field(default=None, metadata={"help": "Seconds (default 30; smoke 5)."})
    budget_reproduce: float | None = field(default=None, metadata={"help": "Seconds (default 170; smoke 45)."})
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
    gemm_size: int | None = field(default=None, metadata={"help": "Side of the GEMMs (default 8192; smoke 256)."})
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: the CPU cores)."})
    dataset_dir: str | None = field(
        default=None, metadata={"help": "CIFAR-10 for the reproduce part (default ../shared/datasets/cifar10)."}
    )
    reproduce_steps: int = field(
        default=300, metadata={"help": "Pre-training steps of each reproduce row (batch 256); ignored with --smoke."}
    )
    seed: int = field(default=0)

    def __post_init__(self):
        unknown = sorted(set(self.part_list()) - set(PARTS))
        if unknown:
            raise ValueError(f"--parts: unknown parts {unknown}; known: {list(PARTS)}.")
        if self.device not in (None, "cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}.")
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"--model_preset must be one of {sorted(MODEL_PRESETS)}, got {self.model_preset!r}.")
        for name in ("batch_size", "max_batch_size", "gemm_size", "reproduce_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}.")
        if self.max_minutes <= 0:
            raise ValueError(f"--max_minutes must be positive, got {self.max_minutes}.")
        if self.smoke:
            # the smoke run is the CPU rehearsal: tiny sizes and short budgets, whatever the machine has
            self.device = "cpu"
            self.max_minutes = min(self.max_minutes, 2.0)
            self.model_preset = "tiny"
            self.batch_size = self.batch_size or 8
            self.max_batch_size = self.max_batch_size or 2 * self.batch_size
            self.compile_backend = self.compile_backend or "aot_eager"
            self.gemm_size = self.gemm_size or 256
        if self.device is None and not torch.cuda.is_available():
            # full sizes on a CPU would take hours (one ViT-S step of batch 128 is about a minute)
            raise ValueError(
                "no CUDA device: run with --smoke for the CPU rehearsal (tiny sizes), or pass --device cpu to run "
                "the full sizes on the CPU anyway."
            )
        self.device = self.device or "cuda"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available.")
        self.batch_size = self.batch_size or 128
        self.max_batch_size = self.max_batch_size or 8192
        self.compile_backend = self.compile_backend or "inductor"
        self.gemm_size = self.gemm_size or 8192
        if self.num_workers is None:
            self.num_workers = os.cpu_count() or 1
        self.dataset_dir = self.dataset_dir or os.path.normpath(DEFAULT_CIFAR10)
        # 7 min 20 s in all; with the process's start and a compilation's overrun the run stays within 8 minutes
        defaults = {"environment": 10, "correctness": 60, "throughput": 170, "data": 30, "reproduce": 170}
        smoke_defaults = {"environment": 4, "correctness": 20, "throughput": 25, "data": 5, "reproduce": 45}
        for part in PARTS:
            if getattr(self, f"budget_{part}") is None:
                setattr(self, f"budget_{part}", float((smoke_defaults if self.smoke else defaults)[part]))

    def part_list(self) -> list[str]:
        return [part.strip() for part in self.parts.split(",") if part.strip()]


# --- budgets, checks and parts ------------------------------------------------------------------------------------


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


def _free_memory(device: str) -> None:
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


def _to_float64(module, args, kwargs):
    """A forward pre-hook that runs a float64 copy of a model on the float32 inputs of the cases."""

    def cast(value):
        return value.double() if torch.is_tensor(value) and value.is_floating_point() else value

    return tuple(cast(value) for value in args), {key: cast(value) for key, value in kwargs.items()}


# --- environment --------------------------------------------------------------------------------------------------


def check_environment(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """Versions, the device, its datasheet peaks and its measured large-GEMM rates."""
    import torchvision

    result: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "mimco": __version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }
    peak = None
    if args.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        result.update(
            gpu_name=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 2),
            compute_capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            gpu_count=torch.cuda.device_count(),
        )
        peak = lookup_gpu_peak(properties.name)
        result["datasheet_peak_tflops"] = asdict(peak) if peak is not None else None
        if peak is None:
            result["datasheet_peak_reason"] = f"{properties.name!r} is not in the table of known GPUs"
    else:
        result["bf16_supported"] = cpu_supports_bf16()
        result["datasheet_peak_tflops"] = None
        result["datasheet_peak_reason"] = "skipped: no CUDA (datasheet peaks are listed for GPUs only)"
    context["peak"] = peak

    checks = Checks()
    rates = {}
    precisions = [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]
    if args.device == "cuda":
        precisions.append(("tf32", torch.float32, True))
    for name, dtype, tf32 in precisions:

        def measure(name=name, dtype=dtype, tf32=tf32) -> dict:
            seconds = min(1.0, budget.remaining() / (2 * len(precisions)))
            measured = measure_gemm_rate(args.device, dtype, args.gemm_size, min_seconds=seconds, allow_tf32=tf32)
            rates[name] = measured["median_flops_per_second"]
            entry = {
                "passed": math.isfinite(rates[name]) and rates[name] > 0,
                "size": measured["size"],
                "calls": measured["calls"],
                "tflops_median": measured["median_flops_per_second"] / 1e12,
                "tflops_best": measured["best_flops_per_second"] / 1e12,
            }
            datasheet = getattr(peak, name, None) if peak is not None else None
            if datasheet:
                entry["fraction_of_datasheet"] = entry["tflops_median"] / datasheet
            return entry

        checks.run(f"gemm_{name}", measure, budget)
    result["gemm"] = {item["name"][5:]: item for item in checks.items}
    context["gemm_rate"] = rates
    result["checks"] = checks.items
    return result


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --- correctness --------------------------------------------------------------------------------------------------


def correctness_shape(smoke: bool) -> dict:
    """A backbone small enough to compare on a CPU in seconds; on a GPU with head_dim 64, so that the fused SDPA
    kernels apply as they do at ViT-S/B size."""
    if smoke:
        return dict(
            image_size=32,
            patch_size=4,
            mask_patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    return dict(
        image_size=64,
        patch_size=8,
        mask_patch_size=16,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
    )


def _configs(shape: dict, smoke: bool) -> dict:
    """The four models' configs for one backbone shape (SDPA attention throughout)."""
    common = dict(shape, attn_implementation="sdpa")
    return {
        "backbone": MimCoConfig(**common),
        "pretraining": MimCoConfig(**common, head_hidden_size=32 if smoke else 512),
        "classification": MimCoConfig(**common, num_labels=10),
        "contrastive": MimCoContrastiveConfig(
            backbone_config=MimCoConfig(**common, position_embedding_type="sincos"),
            freeze_patch_embeddings=True,
            **(dict(projector_hidden_size=64, projection_size=32) if smoke else {}),
        ),
    }


def _model_cases(shape: dict, smoke: bool, batch_size: int) -> dict[str, tuple[Callable, Callable]]:
    """For each model class: a builder, and a function `(model, device) -> dict of tensors` whose "loss" is
    back-propagated. The inputs are drawn once, on the CPU, from a fixed seed."""
    configs = _configs(shape, smoke)
    generator = torch.Generator().manual_seed(0)
    size, hidden = shape["image_size"], shape["hidden_size"]
    tokens = (size // shape["patch_size"]) ** 2 + 1
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    pixels_2 = torch.randn(batch_size, 3, size, size, generator=generator)
    weights = torch.randn(batch_size, tokens, hidden, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    masks = MimCoMaskGenerator.from_config(configs["pretraining"], generator=generator).batch(batch_size)

    def backbone(model, device):
        outputs = model(pixels.to(device))
        # a loss that weighs every output element differently, so that every gradient path is exercised
        loss = (outputs.last_hidden_state * weights.to(device)).sum() / weights.numel()
        return {"loss": loss, "last_hidden_state": outputs.last_hidden_state, "pooler_output": outputs.pooler_output}

    def pretraining(model, device):
        outputs = model(pixels.to(device), bool_masked_pos=masks.to(device))
        return {
            "loss": outputs.loss,
            "patch_loss": outputs.patch_loss,
            "image_loss": outputs.image_loss,
            "last_hidden_state": outputs.last_hidden_state,
        }

    def classification(model, device):
        outputs = model(pixels.to(device), labels=labels.to(device))
        return {"loss": outputs.loss, "logits": outputs.logits}

    def contrastive(model, device):
        # with a momentum, the forward also takes the EMA step of the momentum branch
        outputs = model(pixel_values_1=pixels.to(device), pixel_values_2=pixels_2.to(device), momentum=0.99)
        return {"loss": outputs.loss, "query_1": outputs.queries[0], "key_2": outputs.momentum_keys[1]}

    return {
        "MimCoModel": (lambda: MimCoModel(configs["backbone"]), backbone),
        "MimCoForPreTraining": (lambda: MimCoForPreTraining(configs["pretraining"]), pretraining),
        "MimCoForImageClassification": (
            lambda: MimCoForImageClassification(configs["classification"]),
            classification,
        ),
        "MimCoForContrastivePreTraining": (
            lambda: MimCoForContrastivePreTraining(configs["contrastive"]),
            contrastive,
        ),
    }


def _run_case(model, run: Callable, device: str) -> tuple[dict, dict]:
    outputs = run(model, device)
    outputs["loss"].backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return outputs, gradients


def _differences(outputs: dict, gradients: dict, state: dict, reference) -> dict:
    """The largest relative differences of outputs, gradients and floating state against `reference`'s."""
    ref_outputs, ref_gradients, ref_state = reference
    if set(gradients) != set(ref_gradients):
        raise AssertionError(f"different parameters got gradients: {sorted(set(gradients) ^ set(ref_gradients))}")
    floor = GRADIENT_FLOOR * max(float(g.abs().max()) for g in ref_gradients.values())
    output = {k: relative_difference(outputs[k], v) for k, v in ref_outputs.items() if v is not None}
    gradient = {k: relative_difference(gradients[k], v, floor) for k, v in ref_gradients.items()}
    floating = {k: relative_difference(state[k], v) for k, v in ref_state.items() if v.is_floating_point()}
    worst = max(gradient, key=gradient.get)
    return {
        "output": max(output.values()),
        "gradient": gradient[worst],
        "worst_gradient": worst,
        "state": max(floating.values()),
        "gradients_compared": len(gradient),
    }


def compare_with_cpu(build: Callable, run: Callable, device: str, seed: int) -> dict:
    """fp32 outputs, gradients and state (the momentum branch moves in the forward) of the same model and inputs
    on `device` and on the CPU, as relative differences (`relative_difference`); and, for scale, the CPU's own fp32
    rounding error against a float64 copy."""
    torch.manual_seed(seed)
    cpu_model = build().train()
    device_model = copy.deepcopy(cpu_model).to(device)
    exact_model = copy.deepcopy(cpu_model).double()
    exact_model.register_forward_pre_hook(_to_float64, with_kwargs=True)
    cpu_outputs, cpu_gradients = _run_case(cpu_model, run, "cpu")
    with exact_fp32():
        device_outputs, device_gradients = _run_case(device_model, run, device)
    exact = (*_run_case(exact_model, run, "cpu"), exact_model.state_dict())
    cpu = (cpu_outputs, cpu_gradients, cpu_model.state_dict())
    measured = _differences(device_outputs, device_gradients, device_model.state_dict(), cpu)
    rounding = _differences(cpu_outputs, cpu_gradients, cpu_model.state_dict(), exact)
    result = {
        "max_output_relative_difference": measured["output"],
        "max_gradient_relative_difference": measured["gradient"],
        "worst_gradient": measured["worst_gradient"],
        "max_state_relative_difference": measured["state"],
        "gradients_compared": measured["gradients_compared"],
        "cpu_fp32_vs_fp64_output": rounding["output"],
        "cpu_fp32_vs_fp64_gradient": rounding["gradient"],
        "finite": all(bool(torch.isfinite(g).all()) for g in device_gradients.values()),
    }
    result["passed"] = (
        measured["output"] <= OUTPUT_TOLERANCE
        and measured["gradient"] <= GRADIENT_TOLERANCE
        and measured["state"] <= OUTPUT_TOLERANCE
        and result["finite"]
    )
    return result


def check_correctness(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    device = args.device
    shape = correctness_shape(args.smoke)
    # stage 1's BatchNorm over the batch magnifies bf16 rounding when a random model's features barely differ
    # between images: at the tiny smoke width a batch of 4 moves its bf16 loss by 12 %, a batch of 64 by 0.1 %
    batch_size = 64 if args.smoke else 32
    cases = _model_cases(shape, args.smoke, batch_size)
    checks = Checks()
    result: dict = {
        "shape": shape | {"batch_size": batch_size},
        "tolerances": {
            "output_relative": OUTPUT_TOLERANCE,
            "gradient_relative": GRADIENT_TOLERANCE,
            "bf16_loss_relative": BF16_LOSS_TOLERANCE,
            "compile_loss_relative": COMPILE_LOSS_TOLERANCE,
            "compile_gradient_relative": COMPILE_GRADIENT_TOLERANCE,
            "gradient_floor": GRADIENT_FLOOR,
            "meaning": "max |device - cpu| / max |cpu| per tensor (gradients: at least gradient_floor x the largest "
            "gradient), fp32 with TF32 off; losses: |a - b| / |b|",
        },
    }
    if device == "cpu":
        result["note"] = "no CUDA: the device side is the CPU too, so the device-vs-CPU comparisons exercise the code"

    for name, (build, run) in cases.items():
        checks.run(
            f"fp32_{device}_vs_cpu[{name}]",
            lambda build=build, run=run: compare_with_cpu(build, run, device, args.seed),
            budget,
        )
    for name, (build, run) in cases.items():
        if name != "MimCoModel":  # the backbone's "loss" is a weighted sum of its outputs, not a training loss
            checks.run(
                f"bf16_autocast[{name}]",
                lambda build=build, run=run: _bf16_against_fp32(build, run, device, args.seed),
                budget,
            )
    pretraining = _configs(shape, args.smoke)["pretraining"]
    checks.run("fused_adamw_nan_skip", lambda: _nan_skip(pretraining, device, args.seed), budget)
    checks.run("torch_compile", lambda: _compile_against_eager(pretraining, device, args), budget, needs_seconds=5.0)
    checks.run("sdpa_fused_kernels_bf16", lambda: _sdpa_fused(shape, device, args.seed), budget)
    checks.run("save_load_round_trip", lambda: _round_trip(shape, device, args), budget)
    result["checks"] = checks.items
    return result


def _bf16_against_fp32(build: Callable, run: Callable, device: str, seed: int) -> dict:
    """The loss under bf16 autocast against fp32 on the same device and weights; its backward stays finite."""
    torch.manual_seed(seed)
    model = build().to(device).train()
    with torch.no_grad(), exact_fp32():
        fp32 = float(run(model, device)["loss"])
    if isinstance(model, MimCoForContrastivePreTraining):
        model.reset_momentum_branch()  # the fp32 forward took an EMA step; start the bf16 one from the same state
    with autocast(device, "bf16"):
        outputs = run(model, device)
    bf16 = float(outputs["loss"].detach())
    outputs["loss"].backward()
    finite_gradients = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    difference = abs(bf16 - fp32) / max(abs(fp32), 1e-12)
    return {
        "passed": math.isfinite(bf16) and finite_gradients and difference <= BF16_LOSS_TOLERANCE,
        "loss_fp32": fp32,
        "loss_bf16": bf16,
        "relative_difference": difference,
        "finite_gradients": finite_gradients,
    }


class _NoScaler:
    """What `skip_update_if` reads from an Accelerator: no fp16 loss scaler."""

    scaler = None


def _nan_skip(config: MimCoConfig, device: str, seed: int) -> dict:
    """The training loop's skip: a NaN loss's step leaves the weights and Adam's step count untouched, and the
    next finite step updates them. On CUDA the optimizer must be the fused one (no host-device sync)."""
    torch.manual_seed(seed)
    model = MimCoForPreTraining(config).to(device).train()
    optimizer = build_adamw(model, 1e-3, 0.05, (0.9, 0.95))
    pixels = torch.randn(2, 3, config.image_size, config.image_size, device=device)
    masks = model.mask_generator.batch(2).to(device)
    accelerator = _NoScaler()

    def step(poison: bool) -> None:
        loss = model(pixels, bool_masked_pos=masks).loss
        if poison:
            loss = loss * torch.tensor(float("nan"), device=device)
        loss.backward()
        skip_update_if(optimizer, ~torch.isfinite(loss.detach()), accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def adam_steps() -> list[float]:
        return [float(state["step"]) for state in optimizer.state.values() if "step" in state]

    step(poison=False)
    before, steps_before = snapshot(), adam_steps()
    step(poison=True)
    after_bad, steps_after_bad = snapshot(), adam_steps()
    unchanged = all(torch.equal(before[name], after_bad[name]) for name in before)
    step(poison=False)
    after_good = snapshot()
    moved = any(not torch.equal(after_bad[name], after_good[name]) for name in before)
    finite = all(bool(torch.isfinite(value).all()) for value in after_good.values())
    fused = bool(optimizer.defaults.get("fused"))
    return {
        "passed": unchanged and steps_before == steps_after_bad and moved and finite and (fused or device == "cpu"),
        "fused": fused,
        "weights_unchanged_by_the_nan_step": unchanged,
        "adam_step_count_unchanged": steps_before == steps_after_bad,
        "next_finite_step_updates": moved,
        "weights_finite": finite,
    }


def _compile_against_eager(config: MimCoConfig, device: str, args: GpuCheckArguments) -> dict:
    """The stage-2 model compiled in place as `run_pretraining.py --torch_compile` does, against eager, fp32."""
    torch.manual_seed(args.seed)
    eager = MimCoForPreTraining(config).to(device).train()
    compiled = copy.deepcopy(eager)
    compiled.mimco.compile(backend=args.compile_backend)
    compiled.teacher.compile(backend=args.compile_backend)
    pixels = torch.randn(4, 3, config.image_size, config.image_size, device=device)
    masks = eager.mask_generator.batch(4).to(device)
    with exact_fp32():
        eager_loss = eager(pixels, bool_masked_pos=masks).loss
        eager_loss.backward()
        start = time.perf_counter()
        compiled_loss = compiled(pixels, bool_masked_pos=masks).loss
        compiled_loss.backward()
        synchronize(device)
        first_step = time.perf_counter() - start
    compiled_value, eager_value = float(compiled_loss.detach()), float(eager_loss.detach())
    loss_difference = abs(compiled_value - eager_value) / abs(eager_value)
    eager_gradients = {name: p.grad for name, p in eager.named_parameters() if p.grad is not None}
    floor = GRADIENT_FLOOR * max(float(g.abs().max()) for g in eager_gradients.values())
    gradient_difference = max(
        relative_difference(p.grad, eager_gradients[name], floor)
        for name, p in compiled.named_parameters()
        if p.grad is not None
    )
    return {
        "passed": loss_difference <= COMPILE_LOSS_TOLERANCE and gradient_difference <= COMPILE_GRADIENT_TOLERANCE,
        "backend": args.compile_backend,
        "first_step_seconds_with_compilation": first_step,
        "loss_relative_difference": loss_difference,
        "max_gradient_relative_difference": gradient_difference,
    }


def _sdpa_fused(shape: dict, device: str, seed: int) -> dict:
    """bf16 forward+backward with SDPA restricted to its fused kernels (flash, memory-efficient), each kernel
    alone, and a negative control: a kernel set that cannot run here must be refused, which shows that the
    model's attention really goes through SDPA (and so that the restriction was in force)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(seed)
    model = MimCoModel(MimCoConfig(**shape, attn_implementation="sdpa")).to(device).train()
    pixels = torch.randn(4, 3, shape["image_size"], shape["image_size"], device=device)

    def refusal(backends: list, precision: str = "bf16") -> str | None:
        """None when forward+backward ran with only `backends` allowed, else the first line of the error."""
        try:
            with sdpa_kernel(backends), autocast(device, precision):
                model(pixels).last_hidden_state.float().sum().backward()
            synchronize(device)
            return None
        except RuntimeError as error:
            return str(error).splitlines()[0][:300]

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    both = refusal(fused)
    alone = {backend.name.lower(): refusal([backend]) for backend in fused}
    # flash attention has no float32 kernel on CUDA; a CPU has no cuDNN attention
    if device == "cuda":
        control = refusal([SDPBackend.FLASH_ATTENTION], "fp32")
    else:
        control = refusal([SDPBackend.CUDNN_ATTENTION])
    return {
        "passed": both is None and control is not None,
        "fused_kernels_only": "ran" if both is None else f"refused: {both}",
        **{f"{name}_alone": "ran" if error is None else f"refused: {error}" for name, error in alone.items()},
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "negative_control": "refused as expected" if control is not None else "ran: the model does not call SDPA",
    }


def _round_trip(shape: dict, device: str, args: GpuCheckArguments) -> dict:
    """`save_pretrained` -> `from_pretrained` -> the same device: every tensor and the loss bit-identical."""
    configs = _configs(shape, args.smoke)
    torch.manual_seed(args.seed)
    pretraining = MimCoForPreTraining(configs["pretraining"]).to(device).eval()
    contrastive = MimCoForContrastivePreTraining(configs["contrastive"]).to(device).eval()
    pixels = torch.randn(4, 3, shape["image_size"], shape["image_size"], device=device)
    masks = pretraining.mask_generator.batch(4).to(device)
    cases = (
        ("MimCoForPreTraining", pretraining, lambda model: model(pixels, bool_masked_pos=masks).loss),
        ("MimCoForContrastivePreTraining", contrastive, lambda model: model(pixels, pixels).loss),
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="mimco-gpu-check-") as folder, torch.no_grad():
        for name, original, run in cases:
            path = os.path.join(folder, name)
            original.save_pretrained(path)
            loaded = type(original).from_pretrained(path).to(device).eval()
            ours, theirs = original.state_dict(), loaded.state_dict()
            results[f"{name}_tensors_identical"] = ours.keys() == theirs.keys() and all(
                torch.equal(ours[key], theirs[key]) for key in ours
            )
            before, after = run(original), run(loaded)
            results[f"{name}_loss_identical"] = bool(torch.equal(before, after))
            if not results[f"{name}_loss_identical"]:
                results[f"{name}_loss_difference"] = float((before - after).abs())
    return {"passed": all(v for k, v in results.items() if k.endswith("identical")), **results}


# --- throughput ---------------------------------------------------------------------------------------------------


def _is_out_of_memory(error: BaseException) -> bool:
    """The allocator's `OutOfMemoryError`, or a library's failed workspace allocation (cuBLAS, cuDNN)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "ALLOC_FAILED" in message)


def _step_memory(step: Callable, device: str) -> dict:
    """Peak memory of one call of `step` (CUDA: allocator peak, and what was resident before the call)."""
    if device != "cuda":
        return {}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    synchronize(device)
    return {"peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "resident_before_mib": resident / 2**20}


def _rates(flops: StepFlops, seconds: float, batch_size: int, context: dict, precision: str = "bf16") -> dict:
    """images/s, achieved TFLOP/s, MFU against the datasheet peak and utilisation of the measured GEMM rate."""
    entry = {
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "images_per_second": batch_size / seconds,
        "model_tflops_per_step": flops.total / 1e12,
        "achieved_tflops": flops.total / seconds / 1e12,
    }
    peak = context.get("peak")
    datasheet = getattr(peak, precision, None) if peak is not None else None
    entry["mfu_vs_datasheet"] = flops.total / seconds / (datasheet * 1e12) if datasheet else None
    rate = context.get("gemm_rate", {}).get(precision)
    entry["utilisation_vs_measured_gemm"] = utilisation(flops, seconds, rate) if rate else None
    return entry


def check_throughput(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    device, batch_size = args.device, args.batch_size
    if "gemm_rate" not in context:  # the environment part did not run: measure the limit here
        measured = measure_gemm_rate(device, torch.bfloat16, args.gemm_size, min_seconds=0.5)
        context["gemm_rate"] = {"bf16": measured["median_flops_per_second"]}
        context["peak"] = lookup_gpu_peak(torch.cuda.get_device_name()) if device == "cuda" else None
    checks = Checks()
    preset = MODEL_PRESETS[args.model_preset]
    config = MimCoConfig(**preset, attn_implementation="sdpa")
    contrastive_config = MimCoContrastiveConfig(
        backbone_config=MimCoConfig(**preset, position_embedding_type="sincos", attn_implementation="sdpa"),
        freeze_patch_embeddings=True,  # as run_contrastive_pretraining.py trains it
        # MoCo v3's 4096-wide heads would dominate the tiny smoke model's step
        **(dict(projector_hidden_size=256, projection_size=64) if args.smoke else {}),
    )
    torch.manual_seed(args.seed)
    stage2 = MimCoForPreTraining(config).to(device).train()
    reference = ReferenceMimCo(stage2).to(device).train()
    stage1 = MimCoForContrastivePreTraining(contrastive_config).to(device).train()
    size = config.image_size
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    pixels_2 = torch.randn(batch_size, 3, size, size, device=device)
    masks = stage2.mask_generator.batch(batch_size).to(device)
    ours, theirs = same_loss_check(stage2, reference, (pixels, masks))
    result: dict = {
        "model_preset": args.model_preset,
        "image_size": size,
        "precision": "bf16 autocast",
        "same_weights_loss": {"mimco": ours, "reference": theirs},
        "flops_counting": "model FLOPs: matrix products only, multiply-add = 2 FLOPs, backward = 2x forward "
        "(docs/benchmarks.md); the reference is credited with MimCo's FLOPs, not with its extra work",
        "variants": {},
        "max_batch": {},
    }
    variants = result["variants"]

    def closure(step: Callable, *inputs) -> Callable:
        return lambda *_: step(*inputs)

    stage2_flops = mimco_step_flops(config, batch_size)
    stage1_flops = contrastive_step_flops(contrastive_config, batch_size)
    eager = {
        "stage2_eager": closure(make_mimco_step(stage2, device, "bf16"), pixels, masks),
        "stage2_reference": closure(make_reference_step(reference, device, "bf16"), pixels, masks),
        "stage1_eager": closure(make_contrastive_step(stage1, device, "bf16"), pixels, pixels_2),
    }
    flops_of = {"stage2_eager": stage2_flops, "stage2_reference": stage2_flops, "stage1_eager": stage1_flops}
    rounds = 3 if args.smoke else 20  # timed rounds of each comparison (the deadlines may stop them earlier)

    def eager_and_reference() -> dict:
        deadline = time.perf_counter() + 0.3 * budget.remaining()
        seconds = time_interleaved(eager, (), device, warmup=1 if args.smoke else 2, repeats=rounds, deadline=deadline)
        for name, value in seconds.items():
            variants[name] = _rates(flops_of[name], value, batch_size, context) | _step_memory(eager[name], device)
        speedup = seconds["stage2_reference"] / seconds["stage2_eager"]
        return {"passed": all(math.isfinite(v) for v in seconds.values()), "speedup_vs_reference": speedup}

    checks.run("eager_and_reference", eager_and_reference, budget)
    context["stage2_images_per_second"] = variants.get("stage2_eager", {}).get("images_per_second")

    def gradient_checkpointing() -> dict:
        """The student with gradient checkpointing, beside the plain step: memory against speed."""
        checkpointed = copy.deepcopy(stage2)
        checkpointed.mimco.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        name = "stage2_gradient_checkpointing"
        steps = {
            "stage2_eager": eager["stage2_eager"],
            name: closure(make_mimco_step(checkpointed, device, "bf16"), pixels, masks),
        }
        deadline = time.perf_counter() + 0.12 * budget.remaining()
        seconds = time_interleaved(steps, (), device, warmup=1, repeats=rounds, deadline=deadline)
        variants[name] = _rates(stage2_flops, seconds[name], batch_size, context) | _step_memory(steps[name], device)
        variants[name]["slowdown_vs_eager"] = seconds[name] / seconds["stage2_eager"]
        plain = variants.get("stage2_eager", {}).get("peak_memory_mib")
        if plain and "peak_memory_mib" in variants[name]:
            variants[name]["memory_ratio_vs_eager"] = variants[name]["peak_memory_mib"] / plain
        return {"passed": math.isfinite(seconds[name]), "slowdown_vs_eager": variants[name]["slowdown_vs_eager"]}

    checks.run("gradient_checkpointing", gradient_checkpointing, budget, needs_seconds=5.0)
    _free_memory(device)

    for stage, model, make_step, flops_fn, share in (
        ("stage2", stage2, make_mimco_step, lambda b: mimco_step_flops(config, b), 0.15),
        ("stage1", stage1, make_contrastive_step, lambda b: contrastive_step_flops(contrastive_config, b), 0.18),
    ):

        def max_batch(stage=stage, model=model, make_step=make_step, flops_fn=flops_fn, share=share) -> dict:
            found = _max_batch_by_doubling(
                model, make_step, flops_fn, stage, args, context, share * budget.remaining()
            )
            result["max_batch"][stage] = found
            return {
                "passed": found["largest_fitting"] is not None,
                "largest_fitting": found["largest_fitting"],
                "stopped_because": found["stopped_because"],
            }

        checks.run(f"max_batch[{stage}]", max_batch, budget, needs_seconds=5.0)
        _free_memory(device)

    # compiled steps last: compilation takes longest and cannot be interrupted by the budget. The smoke run times
    # them with dynamo's "eager" backend (graph capture only): correctness' torch_compile check already runs the
    # autograd tracing of --compile_backend, and this part only has to exercise its own timing code.
    backend = "eager" if args.smoke else args.compile_backend
    for stage, model, make_step, inputs, flops in (
        ("stage2", stage2, make_mimco_step, (pixels, masks), stage2_flops),
        ("stage1", stage1, make_contrastive_step, (pixels, pixels_2), stage1_flops),
    ):

        def compiled_step(stage=stage, model=model, make_step=make_step, inputs=inputs, flops=flops) -> dict:
            name = f"{stage}_compiled"
            compiled = copy.deepcopy(model)
            encoders = ("mimco", "teacher") if stage == "stage2" else ("base_encoder", "momentum_encoder")
            for encoder in encoders:  # in place, as the training scripts' --torch_compile does
                getattr(compiled, encoder).compile(backend=backend)
            step = closure(make_step(compiled, device, "bf16"), *inputs)
            start = time.perf_counter()
            step()
            synchronize(device)
            compile_seconds = time.perf_counter() - start
            steps = {f"{stage}_eager": eager[f"{stage}_eager"], name: step}
            deadline = time.perf_counter() + 0.5 * budget.remaining()
            seconds = time_interleaved(steps, (), device, warmup=1, repeats=rounds, deadline=deadline)
            variants[name] = _rates(flops, seconds[name], batch_size, context) | _step_memory(step, device)
            variants[name]["first_step_seconds_with_compilation"] = compile_seconds
            variants[name]["speedup_vs_eager"] = seconds[f"{stage}_eager"] / seconds[name]
            variants[name]["backend"] = backend
            return {"passed": math.isfinite(seconds[name]), "speedup_vs_eager": variants[name]["speedup_vs_eager"]}

        checks.run(f"{stage}_compiled", compiled_step, budget, needs_seconds=5.0 if args.smoke else 40.0)
        _free_memory(device)
    if variants.get("stage2_compiled") and variants.get("stage2_eager"):
        context["stage2_images_per_second"] = max(
            variants["stage2_eager"]["images_per_second"], variants["stage2_compiled"]["images_per_second"]
        )
    if device != "cuda":
        result["memory_note"] = "peak memory per step: skipped: no CUDA (it is read from the CUDA allocator)"
    result["checks"] = checks.items
    return result


def _max_batch_by_doubling(
    model, make_step: Callable, flops_fn: Callable, stage: str, args: GpuCheckArguments, context: dict, seconds: float
) -> dict:
    """Doubles the batch from `--batch_size` until a step runs out of memory, reaches `--max_batch_size`, or the
    next (twice as long) attempt would not fit in `seconds`."""
    device = args.device
    deadline = time.perf_counter() + seconds
    size = model.config.image_size if stage == "stage2" else model.config.backbone_config.image_size
    tried, largest, stopped = [], None, None
    batch = args.batch_size
    step_builder = make_step(model, device, "bf16")  # one optimizer for every size: its state does not grow
    while True:
        started = time.perf_counter()
        try:
            pixels = torch.randn(batch, 3, size, size, device=device)
            if stage == "stage2":
                inputs = (pixels, model.mask_generator.batch(batch).to(device))
            else:
                inputs = (pixels, torch.randn_like(pixels))
            step_builder(*inputs)  # warm-up (allocator growth, kernel choice)
            memory = _step_memory(lambda inputs=inputs: step_builder(*inputs), device)
            synchronize(device)
            timed_start = time.perf_counter()
            step_builder(*inputs)
            synchronize(device)
            step_seconds = time.perf_counter() - timed_start
            tried.append(_rates(flops_fn(batch), step_seconds, batch, context) | memory | {"fits": True})
            largest = batch
        except RuntimeError as error:  # OutOfMemoryError is a RuntimeError
            if not _is_out_of_memory(error):
                raise
            tried.append({"batch_size": batch, "fits": False})
            stopped = "out of memory"
        finally:
            inputs = pixels = None
            for parameter in model.parameters():
                parameter.grad = None
            _free_memory(device)
        if stopped:
            break
        attempt = time.perf_counter() - started
        if batch * 2 > args.max_batch_size:
            stopped = f"reached --max_batch_size {args.max_batch_size}"
            break
        if time.perf_counter() + 2.5 * attempt > deadline:
            stopped = "time budget: the next doubling would not finish in it"
            break
        batch *= 2
    return {"tried": tried, "largest_fitting": largest, "stopped_because": stopped}


# --- data ---------------------------------------------------------------------------------------------------------


def stage2_loader_dataset(config: MimCoConfig, jpegs: list[bytes], seed: int):
    """The stage-2 dataset as `run_pretraining.py` and the training loop build it, over undecoded JPEG records:
    `PretrainingExampleTransform(build_pretraining_transform(...))` attached with `apply_example_transform`, and
    `MimCoPretrainingCollator` run per batch by the loop's seeded-batch wrapper."""
    import datasets

    from .data import (
        MimCoPretrainingCollator,
        PretrainingExampleTransform,
        apply_example_transform,
        build_pretraining_transform,
    )
    from .training import _SeededBatches

    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in jpegs]},
        features=datasets.Features({"image": datasets.Image(decode=False)}),
    )
    transform = build_pretraining_transform(config.image_size, config.image_mean, config.image_std, normalize=False)
    dataset = apply_example_transform(
        dataset, PretrainingExampleTransform(transform, "image", draft_for=(config.image_size, 0.67))
    )
    collator = MimCoPretrainingCollator(
        MimCoMaskGenerator.from_config(config),
        image_size=config.image_size,
        normalize_with=(config.image_mean, config.image_std),
    )
    return _SeededBatches(dataset, collator, seed)


def loader_rate(seeded, batch_size: int, workers: int, seconds: float) -> dict:
    """images/s of a DataLoader built like the training loop's, in steady state: the first `workers` batches
    (worker start-up, each worker's first batch) are not timed; then batches are read for `seconds`.

    The images are drawn with replacement from the (small) dataset, so that the run never ends for want of rows;
    which images a batch holds does not change what decoding and augmenting it costs.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from .training import _only_batch

    sampler = RandomSampler(seeded, replacement=True, num_samples=10**8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        seeded,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=_only_batch,
        num_workers=workers,
        drop_last=True,
        timeout=120 if workers > 0 else 0,
    )
    iterator = iter(loader)
    try:
        for _ in range(workers):
            next(iterator)
        images, start = 0, time.perf_counter()
        while True:
            images += int(next(iterator)["pixel_values"].shape[0])
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    finally:
        del iterator  # shuts the workers down
    return {"workers": workers, "images": images, "seconds": elapsed, "images_per_second": images / elapsed}


def check_data(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    config = MimCoConfig(**MODEL_PRESETS[args.model_preset])
    checks = Checks()
    batch_size, workers = args.batch_size, args.num_workers
    jpegs = make_jpegs(16 if args.smoke else 256, (500, 375), args.seed)
    seeded = stage2_loader_dataset(config, jpegs, args.seed)
    result: dict = {
        "source_images": f"{len(jpegs)} generated 500x375 JPEGs (quality 90), drawn with replacement",
        "image_size": config.image_size,
        "batch_size": batch_size,
        "cpu_count": os.cpu_count(),
    }

    def one_process() -> dict:
        measured = loader_rate(seeded, batch_size, 0, 0.15 * budget.remaining())
        result["one_process"] = measured
        return {"passed": measured["images"] > 0, **measured}

    def all_workers() -> dict:
        measured = loader_rate(seeded, batch_size, workers, 0.45 * budget.remaining())
        result["all_workers"] = measured
        return {"passed": measured["images"] > 0, **measured}

    checks.run("loader_one_process", one_process, budget)
    checks.run("loader_all_workers", all_workers, budget)
    step_rate = context.get("stage2_images_per_second")
    if step_rate and "one_process" in result and "all_workers" in result:
        per_core = result["one_process"]["images_per_second"]
        loader = result["all_workers"]["images_per_second"]
        result["versus_step"] = {
            "stage2_step_images_per_second": step_rate,
            "loader_images_per_second": loader,
            "loader_over_step": loader / step_rate,
            "gpu_starved": loader < step_rate,
            # one worker per core scales about linearly, until memory bandwidth or the main process limits it
            "cores_needed_at_one_process_rate": math.ceil(step_rate / per_core),
        }
    else:
        result["versus_step"] = {"reason": "skipped: no stage-2 step rate from the throughput part"}

    def device_decoding() -> dict:
        measured = device_decode_rate(jpegs, batch_size, args.device, 0.8 * budget.remaining(), config)
        result["device_jpeg_decoding"] = measured
        return {"passed": measured["decode_images_per_second"] > 0, **measured}

    checks.run("decode_jpeg_on_device", device_decoding, budget)
    result["checks"] = checks.items
    return result


def device_decode_rate(jpegs: list[bytes], batch_size: int, device: str, seconds: float, config) -> dict:
    """Batched `torchvision.io.decode_jpeg` on `device` (nvJPEG on CUDA), alone and followed by the stage-2 crop,
    flip and normalisation on the device: the opt-in path of decoding on the GPU (the training scripts decode on
    the CPU, in the loader workers)."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    encoded = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(batch_size)]
    crop = v2.Compose(
        [
            v2.RandomResizedCrop(config.image_size, scale=(0.67, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )
    mean = torch.tensor(config.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, device=device).view(1, 3, 1, 1)

    def decode() -> list[torch.Tensor]:
        return decode_jpeg(encoded, device=device)

    def decode_and_augment() -> torch.Tensor:
        images = torch.stack([crop(image) for image in decode()])
        return (images.float() / 255.0 - mean) / std

    rates = {}
    for name, function in (("decode", decode), ("decode_and_augment", decode_and_augment)):
        function()  # warm-up: decoder handles, kernels
        synchronize(device)
        calls, start = 0, time.perf_counter()
        while calls < 2 or (time.perf_counter() - start < seconds / 2 and calls < 500):
            function()
            calls += 1
        synchronize(device)
        rates[f"{name}_images_per_second"] = calls * batch_size / (time.perf_counter() - start)
    return {"device": device, "batch_size": batch_size, "opt_in": True, **rates}


# --- reproduce ----------------------------------------------------------------------------------------------------


def check_reproduce(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """A short `scripts/reproduce.py` run in a subprocess, stopped at the part's budget; rows that finished are
    reported (the script writes its results file after each row)."""
    script = os.path.join(REPO_ROOT, "scripts", "reproduce.py")
    if not os.path.isfile(script):
        raise PartSkipped(f"skipped: {script} not found (the kit runs from a clone of the repository)")
    if not os.path.isdir(args.dataset_dir):
        raise PartSkipped(f"skipped: CIFAR-10 not found at {args.dataset_dir} (pass --dataset_dir)")
    folder = os.path.abspath(os.path.join(args.output_dir, "reproduce"))
    results_dir = os.path.join(folder, "results")
    flags = ["--dataset_name", os.path.abspath(args.dataset_dir), "--output_dir", folder, "--results_dir", results_dir]
    flags += ["--seed", str(args.seed)]
    if args.smoke:
        # one row is enough to exercise this part (tests/test_reproduce.py runs the script's smoke mode in full)
        flags += ["--smoke", "--rows", "teacher", "--num_threads", "1"]
    else:
        # the main comparison; pre-training runs on the GPU (Accelerate picks it), evaluation on the CPU
        threads = max((os.cpu_count() or 2) // 2, 1)
        flags += ["--rows", "teacher", "mimco", "pixel_mim", "random_init", "--budget_minutes", "4"]
        flags += ["--pretrain_steps", str(args.reproduce_steps), "--batch_size", "256"]
        flags += ["--probe_train_samples", "5000", "--eval_samples", "2000", "--probe_epochs", "30"]
        flags += ["--finetune_samples", "5000", "--finetune_epochs", "1", "--tsne_points", "500"]
        flags += ["--num_threads", str(threads), "--num_workers", str(min(4, args.num_workers))]
    command = [sys.executable, script, *flags]
    # a fresh folder: reproduce.py would otherwise skip the rows a previous check finished (the folder is the kit's)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "reproduce.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # its own process group, so that the budget can stop the script and the loader workers it started
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        stopped_by_budget = False
        try:
            process.wait(timeout=max(budget.remaining(), 1.0))
        except subprocess.TimeoutExpired:
            stopped_by_budget = True
            _stop_group(process)
    seconds = time.perf_counter() - start
    result: dict = {
        "command": " ".join(command),
        "returncode": process.returncode,
        "seconds": seconds,
        "stopped_by_budget": stopped_by_budget,
        "log": log_path,
        "devices": "pre-training: Accelerate's default device (the GPU when there is one); probe and fine-tune: CPU "
        "(reproduce.py evaluates on the CPU)",
    }
    results_path = os.path.join(results_dir, "reproduce_results.json")
    state = None
    if os.path.isfile(results_path):
        with open(results_path) as handle:
            state = json.load(handle)
    rows = (state or {}).get("rows", {})
    result["rows_finished"] = sorted(rows)
    result["pretrain_steps"] = (state or {}).get("settings", {}).get("pretrain_steps")
    result["table_markdown"] = _reproduce_table(script, state) if rows else None
    result["rows"] = {
        key: {name: row.get(name) for name in ("linear_probe_top1_cls", "knn_top1_cls", "finetune_top1")}
        | {"pretraining_seconds": row.get("pretraining_seconds")}
        for key, row in rows.items()
    }
    checks = Checks()
    if stopped_by_budget:
        result["reason"] = f"stopped by its time budget after {seconds:.0f} s; finished rows: {sorted(rows) or 'none'}"
        checks.add("reproduce_rows", bool(rows), detail=result["reason"])
    else:
        with open(log_path) as handle:
            tail = handle.read()[-3000:]
        if process.returncode != 0:
            result["log_tail"] = tail
        checks.add("reproduce_rows", process.returncode == 0 and bool(rows), returncode=process.returncode)
    result["checks"] = checks.items
    return result


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _reproduce_table(script: str, state: dict) -> str:
    """The script's own Markdown table of the rows that finished."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mimco_reproduce_for_gpu_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown_table(state)


# --- the run ------------------------------------------------------------------------------------------------------


PART_FUNCTIONS: dict[str, Callable[[GpuCheckArguments, dict, Budget], dict]] = {
    "environment": check_environment,
    "correctness": check_correctness,
    "throughput": check_throughput,
    "data": check_data,
    "reproduce": check_reproduce,
}


def run_part(name: str, args: GpuCheckArguments, context: dict, run_deadline: float) -> dict:
    """Runs one part under its budget; an exception becomes `status: failed` with the error, never a crash."""
    budget = Budget(getattr(args, f"budget_{name}"), run_deadline)
    start = time.perf_counter()
    entry: dict = {"budget_seconds": budget.seconds}
    if budget.expired():
        return entry | {"status": "skipped", "reason": "skipped: the run's --max_minutes were spent", "seconds": 0.0}
    try:
        result = PART_FUNCTIONS[name](args, context, budget)
        checks = result.get("checks", [])
        failed = any(check["status"] == "failed" for check in checks)
        entry["status"] = "failed" if failed else "ok"
        entry.update(result)
    except PartSkipped as skip:
        entry.update(status="skipped", reason=str(skip))
    except Exception as error:  # one broken part must not cost the others their report
        entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        entry["traceback"] = traceback.format_exc(limit=12)[-6000:]
    finally:
        _free_memory(args.device)
    entry["seconds"] = time.perf_counter() - start
    if entry["seconds"] > budget.seconds * 1.1 + 5:
        entry["over_budget_note"] = "ran past its budget (a compilation or a single step cannot be interrupted)"
    return entry


def run_check(args: GpuCheckArguments, command: str | None = None) -> dict:
    """Runs the selected parts in order and writes the report after each, so that a killed run leaves one.
    `command` is the command line recorded in the report."""
    started = time.perf_counter()
    # the margin covers the process's start (imports) and what cannot stop on time (a compilation, one step)
    run_deadline = started + 60.0 * args.max_minutes - (10.0 if args.smoke else 25.0)
    if args.smoke:
        torch.set_num_threads(1)  # the CI machine's few cores are shared with the loader workers
    report = {
        "version": REPORT_VERSION,
        "kit": "modeling_mimco.gpu_check",
        "command": command or "run_check(...)",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": args.device,
        "settings": asdict(args),
        "parts": {},
    }
    context: dict = {}
    for name in args.part_list():
        print(f"[gpu_check] {name} (budget {getattr(args, f'budget_{name}'):.0f} s) ...", flush=True)
        report["parts"][name] = run_part(name, args, context, run_deadline)
        part = report["parts"][name]
        print(f"[gpu_check] {name}: {part['status']} in {part['seconds']:.1f} s", flush=True)
        report["total_seconds"] = time.perf_counter() - started
        write_report(report, args.output_dir)
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["total_seconds"] = time.perf_counter() - started
    write_report(report, args.output_dir)
    return report


def write_report(report: dict, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for name, text in (
        ("report.json", json.dumps(report, indent=2, default=str)),
        ("report.md", report_markdown(report)),
    ):
        temporary = os.path.join(output_dir, name + ".tmp")
        with open(temporary, "w") as handle:
            handle.write(text + "\n")
        os.replace(temporary, os.path.join(output_dir, name))


# --- the Markdown report ------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _check_detail(check: dict) -> str:
    skip = {"name", "status", "traceback"}
    parts = []
    for key, value in check.items():
        if key in skip or isinstance(value, (dict, list)):
            continue
        parts.append(f"{key} {_fmt(value)}")
    return "; ".join(parts).replace("|", "/")


def report_markdown(report: dict) -> str:
    """The report as Markdown: a summary of the parts, then each part's figures and checks."""
    lines = [
        "# MimCo GPU check",
        "",
        f"`{report['command']}`, started {report['started']}, {report.get('total_seconds', 0):.0f} s in all; "
        f"device: {report['device']}{' (smoke run: tiny sizes on the CPU)' if report['smoke'] else ''}.",
        "",
        "| part | status | seconds | budget | note |",
        "|---|---|---:|---:|---|",
    ]
    for name, part in report["parts"].items():
        note = part.get("reason") or part.get("error") or part.get("over_budget_note") or ""
        failed = [check["name"] for check in part.get("checks", []) if check["status"] == "failed"]
        if failed:
            note = f"{note} failed: {', '.join(failed)}".strip()
        lines.append(
            f"| {name} | {part['status']} | {part['seconds']:.1f} | {part['budget_seconds']:.0f} | "
            f"{note.replace('|', '/')[:300]} |"
        )
    sections = {
        "environment": _environment_markdown,
        "correctness": _correctness_markdown,
        "throughput": _throughput_markdown,
        "data": _data_markdown,
        "reproduce": _reproduce_markdown,
    }
    for name, part in report["parts"].items():
        lines += ["", f"## {name.capitalize()}", ""]
        if part["status"] == "skipped":
            lines.append(part.get("reason", "skipped"))
            continue
        if part.get("error"):
            lines += [f"Failed: {part['error']}", "", "```", part.get("traceback", "").strip(), "```"]
        lines += sections[name](part)
        if part.get("checks"):
            lines += ["", "| check | status | measured |", "|---|---|---|"]
            for check in part["checks"]:
                detail = check.get("reason") or check.get("error") or _check_detail(check)
                lines.append(f"| {check['name']} | {check['status']} | {detail[:400]} |")
    return "\n".join(lines)


def _environment_markdown(part: dict) -> list[str]:
    keys = ("gpu_name", "gpu_memory_gib", "compute_capability", "multiprocessors", "bf16_supported", "torch")
    keys += ("torch_cuda", "cudnn", "transformers", "torchvision", "cpu_model", "cpu_count")
    lines = [f"- {key}: {_fmt(part.get(key))}" for key in keys if key in part]
    peak = part.get("datasheet_peak_tflops")
    if peak:
        note = f" ({peak['note']})" if peak.get("note") else ""
        lines.append(
            f"- datasheet peak ({peak['part']}, dense): bf16 {_fmt(peak['bf16'], 1)}, fp32 {_fmt(peak['fp32'], 1)}, "
            f"TF32 {_fmt(peak['tf32'], 1)} TFLOP/s{note}"
        )
    else:
        lines.append(f"- datasheet peak: {part.get('datasheet_peak_reason')}")
    lines += ["", "| GEMM | size | TFLOP/s (median) | TFLOP/s (best) | of datasheet |", "|---|---:|---:|---:|---:|"]
    for name, gemm in part.get("gemm", {}).items():
        lines.append(
            f"| {name} | {gemm.get('size', '–')} | {_fmt(gemm.get('tflops_median'))} | "
            f"{_fmt(gemm.get('tflops_best'))} | {_fmt(gemm.get('fraction_of_datasheet'))} |"
        )
    return lines


def _correctness_markdown(part: dict) -> list[str]:
    tolerances = part.get("tolerances")
    if not tolerances:
        return []
    text = (
        f"Tolerances: outputs {tolerances['output_relative']:g}, gradients {tolerances['gradient_relative']:g} "
        f"({tolerances['meaning']}); bf16 loss {tolerances['bf16_loss_relative']:g}; compiled loss "
        f"{tolerances['compile_loss_relative']:g}, gradients {tolerances['compile_gradient_relative']:g}. "
        f"Shape: {part.get('shape')}."
    )
    return [text + (f" Note: {part['note']}." if part.get("note") else "")]


def _throughput_row(name: str, entry: dict, note: str = "") -> str:
    return (
        f"| {name} | {entry['batch_size']} | {_fmt(entry['images_per_second'], 1)} | "
        f"{_fmt(entry['seconds_per_step'], 4)} | {_fmt(entry['achieved_tflops'])} | "
        f"{_fmt(entry.get('mfu_vs_datasheet'))} | {_fmt(entry.get('utilisation_vs_measured_gemm'))} | "
        f"{_fmt(entry.get('peak_memory_mib'), 0)} | {note} |"
    )


def _throughput_markdown(part: dict) -> list[str]:
    lines = [
        f"{part.get('model_preset')} at {part.get('image_size')} px, {part.get('precision')}. FLOPs: "
        f"{part.get('flops_counting')}. Same weights, same inputs: loss {part.get('same_weights_loss')}.",
        "",
        "| variant | batch | images/s | s/step | TFLOP/s | MFU (datasheet) | of measured GEMM | peak MiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in part.get("variants", {}).items():
        notes = [f"{key} {_fmt(entry[key])}" for key in ("speedup_vs_eager", "slowdown_vs_eager") if key in entry]
        if "memory_ratio_vs_eager" in entry:
            notes.append(f"memory_ratio_vs_eager {_fmt(entry['memory_ratio_vs_eager'])}")
        if "first_step_seconds_with_compilation" in entry:
            notes.append(f"compile {entry['first_step_seconds_with_compilation']:.0f} s ({entry['backend']})")
        lines.append(_throughput_row(name, entry, ", ".join(notes)))
    for stage, found in part.get("max_batch", {}).items():
        for entry in found["tried"]:
            if entry.get("fits"):
                lines.append(_throughput_row(f"{stage}_eager, doubling", entry))
            else:
                lines.append(f"| {stage}_eager, doubling | {entry['batch_size']} | out of memory | | | | | | |")
        lines.append(
            f"| {stage}: largest batch that fits | {found['largest_fitting']} | | | | | | | "
            f"stopped: {found['stopped_because']} |"
        )
    if part.get("memory_note"):
        lines += ["", part["memory_note"]]
    return lines


def _data_markdown(part: dict) -> list[str]:
    lines = [f"{part.get('source_images')}, cropped to {part.get('image_size')} px, batch {part.get('batch_size')}."]
    versus = part.get("versus_step")
    if versus:
        lines += ["", "Loader against the stage-2 step: " + "; ".join(f"{k} {_fmt(v)}" for k, v in versus.items())]
    return lines


def _reproduce_markdown(part: dict) -> list[str]:
    lines = [f"`{part.get('command', '')}`", "", part.get("devices", ""), ""]
    if part.get("reason"):
        lines += [part["reason"], ""]
    lines.append(part.get("table_markdown") or "No row finished.")
    if part.get("log_tail"):
        lines += ["", "```", part["log_tail"].strip()[-2000:], "```"]
    return lines


# --- command line -------------------------------------------------------------------------------------------------


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(GpuCheckArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    argv = sys.argv[1:] if argv is None else argv
    report = run_check(args, " ".join(["scripts/gpu_check.py", *argv]))
    print(f"[gpu_check] report: {os.path.join(args.output_dir, 'report.md')} and report.json")
    return report


def cli(argv: list[str] | None = None) -> int:
    """Runs the check; the exit code is 1 when a part failed, so that CI and `make gpu-check` notice."""
    report = main(sys.argv[1:] if argv is None else argv)
    return 1 if any(part["status"] == "failed" for part in report["parts"].values()) else 0


__all__ = ["PARTS", "GpuCheckArguments", "cli", "main", "run_check", "write_report"]
