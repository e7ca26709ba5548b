"""The GPU check's `throughput` part: stage-2 and stage-1 training steps in bf16, eager and compiled, beside the
stock-transformers reference step: images/s, model FLOPs utilisation against the datasheet peak and the measured
GEMM rate, peak memory; gradient checkpointing's memory against its speed; the largest batch that fits, found by
doubling. It leaves the stage-2 step's images/s in the run's context for the data part. Imports torch, the model
files and the package's `benchmarking`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, Checks, free_memory
from modeling_mimco.benchmarks.gpu_check.peaks import lookup_gpu_peak
from modeling_mimco.benchmarks.measurement import (
    ReferenceMimCo,
    StepFlops,
    contrastive_step_flops,
    make_contrastive_step,
    make_mimco_step,
    make_reference_step,
    measure_gemm_rate,
    mimco_step_flops,
    same_loss_check,
    synchronize,
    time_interleaved,
    utilisation,
)
from modeling_mimco.configuration_mimco import MODEL_PRESETS, MimCoConfig, MimCoContrastiveConfig
from modeling_mimco.modeling_mimco import MimCoForPreTraining
from modeling_mimco.modeling_mimco_contrastive import MimCoForContrastivePreTraining


FLOPS_COUNTING = (
    "model FLOPs: matrix products only, multiply-add = 2 FLOPs, backward = 2x forward (docs/benchmarks.md); the "
    "reference is credited with MimCo's FLOPs, not with its extra work"
)


def check_throughput(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """Times the eager steps and the reference, gradient checkpointing, the batch doubling and the compiled steps,
    each as one check, in that order (compilation takes longest and cannot be interrupted by the budget)."""
    device = args.device
    _measure_limit_if_missing(args, context)
    run = ThroughputRun(args, context, budget)
    checks = Checks()
    checks.run("eager_and_reference", run.eager_and_reference, budget)
    context["stage2_images_per_second"] = run.variants.get("stage2_eager", {}).get("images_per_second")
    context["stage1_images_per_second"] = run.variants.get("stage1_eager", {}).get("images_per_second")
    checks.run("gradient_checkpointing", run.gradient_checkpointing, budget, needs_seconds=5.0)
    free_memory(device)
    for stage in run.stages.values():
        checks.run(f"max_batch[{stage.name}]", lambda stage=stage: run.max_batch(stage), budget, needs_seconds=5.0)
        free_memory(device)
    # The smoke run times the compiled steps with dynamo's "eager" backend (graph capture only): correctness'
    # torch_compile check already runs the autograd tracing of --compile_backend, and this part only has to exercise
    # its own timing code.
    backend = "eager" if args.smoke else args.compile_backend
    for stage in run.stages.values():
        checks.run(
            f"{stage.name}_compiled",
            lambda stage=stage: run.compiled(stage, backend),
            budget,
            needs_seconds=5.0 if args.smoke else 40.0,
        )
        free_memory(device)
    # the whole stage-2 model compiled, per preset: eager, default mode and CUDA graphs (reduce-overhead)
    for preset in args.compile_presets.split(","):
        checks.run(
            f"stage2_compile_modes[{preset}]",
            lambda preset=preset: run.compile_modes(preset, backend),
            budget,
            needs_seconds=5.0 if args.smoke else 60.0,
        )
        free_memory(device)
    variants = run.variants
    if variants.get("stage2_compiled") and variants.get("stage2_eager"):
        context["stage2_images_per_second"] = max(
            variants["stage2_eager"]["images_per_second"], variants["stage2_compiled"]["images_per_second"]
        )
    if device != "cuda":
        run.result["memory_note"] = "peak memory per step: skipped: no CUDA (it is read from the CUDA allocator)"
    run.result["checks"] = checks.items
    return run.result


def _measure_limit_if_missing(args: GpuCheckArguments, context: dict) -> None:
    """The bf16 GEMM rate and the datasheet peak, when the environment part did not run and leave them."""
    if "gemm_rate" in context:
        return
    measured = measure_gemm_rate(args.device, torch.bfloat16, args.gemm_size, min_seconds=0.5)
    context["gemm_rate"] = {"bf16": measured["median_flops_per_second"]}
    context["peak"] = lookup_gpu_peak(torch.cuda.get_device_name()) if args.device == "cuda" else None


def stage_configs(args: GpuCheckArguments) -> tuple[MimCoConfig, MimCoContrastiveConfig]:
    """The stage-2 and stage-1 configs at `--model_preset`, with SDPA attention."""
    preset = MODEL_PRESETS[args.model_preset]
    config = MimCoConfig(**preset, attn_implementation="sdpa")
    contrastive_config = MimCoContrastiveConfig(
        backbone_config=MimCoConfig(**preset, position_embedding_type="sincos", attn_implementation="sdpa"),
        freeze_patch_embeddings=True,  # as run_contrastive_pretraining.py trains it
        # MoCo v3's 4096-wide heads would dominate the tiny smoke model's step
        **(dict(projector_hidden_size=256, projection_size=64) if args.smoke else {}),
    )
    return config, contrastive_config


@dataclass
class Stage:
    """One pre-training stage as the throughput part times it."""

    name: str  # "stage2" or "stage1"
    model: torch.nn.Module
    make_step: Callable  # `make_mimco_step` or `make_contrastive_step`
    inputs: tuple[torch.Tensor, torch.Tensor]  # the step's inputs at `--batch_size`
    flops_at: Callable[[int], StepFlops]  # model FLOPs of one step at a batch size
    max_batch_share: float  # the share of the part's remaining budget that the batch doubling may use


def _closure(step: Callable, *inputs) -> Callable:
    """`step` bound to `inputs`, as `time_interleaved` calls it (with no inputs of its own)."""
    return lambda *_: step(*inputs)


class ThroughputRun:
    """The models, inputs and eager steps that the throughput checks share, and the part's result as they fill it
    (`result["variants"]`: one entry of rates and memory per timed step)."""

    def __init__(self, args: GpuCheckArguments, context: dict, budget: Budget):
        self.args, self.context, self.budget = args, context, budget
        self.device, self.batch_size = args.device, args.batch_size
        self.rounds = 3 if args.smoke else 20  # timed rounds of each comparison (the deadlines may stop them earlier)
        config, contrastive_config = stage_configs(args)
        device, batch_size = self.device, self.batch_size
        torch.manual_seed(args.seed)
        stage2 = MimCoForPreTraining(config).to(device).train()
        reference = ReferenceMimCo(stage2).to(device).train()
        stage1 = MimCoForContrastivePreTraining(contrastive_config).to(device).train()
        size = config.image_size
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        pixels_2 = torch.randn(batch_size, 3, size, size, device=device)
        masks = stage2.mask_generator.batch(batch_size).to(device)
        ours, theirs = same_loss_check(stage2, reference, (pixels, masks))
        self.stages = {
            "stage2": Stage(
                name="stage2",
                model=stage2,
                make_step=make_mimco_step,
                inputs=(pixels, masks),
                flops_at=lambda batch: mimco_step_flops(config, batch),
                max_batch_share=0.15,
            ),
            "stage1": Stage(
                name="stage1",
                model=stage1,
                make_step=make_contrastive_step,
                inputs=(pixels, pixels_2),
                flops_at=lambda batch: contrastive_step_flops(contrastive_config, batch),
                max_batch_share=0.18,
            ),
        }
        self.eager = {
            "stage2_eager": _closure(make_mimco_step(stage2, device, "bf16"), pixels, masks),
            "stage2_reference": _closure(make_reference_step(reference, device, "bf16"), pixels, masks),
            "stage1_eager": _closure(make_contrastive_step(stage1, device, "bf16"), pixels, pixels_2),
        }
        self.result: dict = {
            "model_preset": args.model_preset,
            "image_size": size,
            "precision": "bf16 autocast",
            "same_weights_loss": {"mimco": ours, "reference": theirs},
            "flops_counting": FLOPS_COUNTING,
            "variants": {},
            "max_batch": {},
        }
        self.variants: dict[str, dict] = self.result["variants"]

    def _record(self, name: str, flops: StepFlops, seconds: float, step: Callable) -> dict:
        """Stores the rates of a timed step and the peak memory of one more call of it as `variants[name]`."""
        self.variants[name] = _rates(flops, seconds, self.batch_size, self.context) | _step_memory(step, self.device)
        return self.variants[name]

    def _time(self, steps: dict[str, Callable], share: float, warmup: int = 1) -> dict[str, float]:
        """Median seconds per step, interleaved, within `share` of the part's remaining budget."""
        deadline = time.perf_counter() + share * self.budget.remaining()
        return time_interleaved(steps, (), self.device, warmup=warmup, repeats=self.rounds, deadline=deadline)

    def eager_and_reference(self) -> dict:
        """Both eager stages and the stock-transformers reference, timed in the same rounds."""
        seconds = self._time(self.eager, 0.3, warmup=1 if self.args.smoke else 2)
        flops = {name: self.stages[name.split("_")[0]].flops_at(self.batch_size) for name in self.eager}
        for name, value in seconds.items():
            self._record(name, flops[name], value, self.eager[name])
        speedup = seconds["stage2_reference"] / seconds["stage2_eager"]
        return {"passed": all(math.isfinite(v) for v in seconds.values()), "speedup_vs_reference": speedup}

    def gradient_checkpointing(self) -> dict:
        """The student with gradient checkpointing, beside the plain step: memory against speed."""
        stage = self.stages["stage2"]
        checkpointed = copy.deepcopy(stage.model)
        checkpointed.mimco.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        name = "stage2_gradient_checkpointing"
        steps = {
            "stage2_eager": self.eager["stage2_eager"],
            name: _closure(make_mimco_step(checkpointed, self.device, "bf16"), *stage.inputs),
        }
        seconds = self._time(steps, 0.12)
        entry = self._record(name, stage.flops_at(self.batch_size), seconds[name], steps[name])
        entry["slowdown_vs_eager"] = seconds[name] / seconds["stage2_eager"]
        plain = self.variants.get("stage2_eager", {}).get("peak_memory_mib")
        if plain and "peak_memory_mib" in entry:
            entry["memory_ratio_vs_eager"] = entry["peak_memory_mib"] / plain
        return {"passed": math.isfinite(seconds[name]), "slowdown_vs_eager": entry["slowdown_vs_eager"]}

    def max_batch(self, stage: Stage) -> dict:
        """The largest batch of `stage` that fits, found by doubling from `--batch_size`."""
        seconds = stage.max_batch_share * self.budget.remaining()
        found = max_batch_by_doubling(stage, self.args, self.context, seconds)
        self.result["max_batch"][stage.name] = found
        return {
            "passed": found["largest_fitting"] is not None,
            "largest_fitting": found["largest_fitting"],
            "stopped_because": found["stopped_because"],
        }

    def compiled(self, stage: Stage, backend: str) -> dict:
        """A copy of `stage`'s model compiled in place, its first step (with compilation) timed alone, then beside
        the eager step."""
        name = f"{stage.name}_compiled"
        compiled = copy.deepcopy(stage.model)
        compiled.compile(backend=backend)  # the whole model, as the training commands' --torch_compile does
        step = _closure(stage.make_step(compiled, self.device, "bf16"), *stage.inputs)
        start = time.perf_counter()
        step()
        synchronize(self.device)
        compile_seconds = time.perf_counter() - start
        eager = f"{stage.name}_eager"
        seconds = self._time({eager: self.eager[eager], name: step}, 0.5)
        entry = self._record(name, stage.flops_at(self.batch_size), seconds[name], step)
        entry["first_step_seconds_with_compilation"] = compile_seconds
        entry["speedup_vs_eager"] = seconds[eager] / seconds[name]
        entry["backend"] = backend
        return {"passed": math.isfinite(seconds[name]), "speedup_vs_eager": entry["speedup_vs_eager"]}

    def compile_modes(self, preset: str, backend: str) -> dict:
        """The whole stage-2 model at `preset`: eager, compiled (default mode) and, on a GPU with inductor, compiled
        with CUDA graphs (`reduce-overhead`), timed in the same rounds; graph breaks and recompilations counted."""
        config = MimCoConfig(**MODEL_PRESETS[preset], attn_implementation="sdpa")
        torch.manual_seed(self.args.seed)
        model = MimCoForPreTraining(config).to(self.device).train()
        size, batch = config.image_size, self.batch_size
        pixels = torch.randn(batch, 3, size, size, device=self.device)
        masks = model.mask_generator.batch(batch).to(self.device)
        seeds = torch.arange(batch, device=self.device)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(pixels, bool_masked_pos=masks, sample_seeds=seeds)
        modes = ["default"] + (["reduce-overhead"] if self.device == "cuda" and backend == "inductor" else [])
        steps = {f"{preset}_eager": _closure(make_mimco_step(model, self.device, "bf16", seeds), pixels, masks)}
        compile_seconds = {}
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        for mode in modes:
            compiled = copy.deepcopy(model)
            compiled.compile(backend=backend, **({"mode": mode} if backend == "inductor" else {}))
            name = f"{preset}_compiled_{mode}"
            steps[name] = _closure(make_mimco_step(compiled, self.device, "bf16", seeds), pixels, masks)
            start = time.perf_counter()
            steps[name]()
            synchronize(self.device)
            compile_seconds[name] = time.perf_counter() - start
        seconds = self._time(steps, 0.5)
        flops = mimco_step_flops(config, batch)
        entries = {}
        for name, value in seconds.items():
            entries[name] = self._record(name, flops, value, steps[name])
            if name in compile_seconds:
                entries[name]["first_step_seconds_with_compilation"] = compile_seconds[name]
                entries[name]["speedup_vs_eager"] = seconds[f"{preset}_eager"] / value
        recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        summary = {
            "graph_breaks": explanation.graph_break_count,
            "graphs": explanation.graph_count,
            "recompilations_while_timing": recompiles,
            "backend": backend,
            "images_per_second": {name: entry["images_per_second"] for name, entry in entries.items()},
        }
        self.result.setdefault("compile_modes", {})[preset] = summary
        return {"passed": explanation.graph_break_count == 0 and all(map(math.isfinite, seconds.values()))} | summary


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


# --- the largest batch --------------------------------------------------------------------------------------------


def max_batch_by_doubling(stage: Stage, args: GpuCheckArguments, context: dict, seconds: float) -> dict:
    """Doubles the batch from `--batch_size` until a step runs out of memory, reaches `--max_batch_size`, or the
    next (twice as long) attempt would not fit in `seconds`."""
    deadline = time.perf_counter() + seconds
    tried, largest, stopped = [], None, None
    batch = args.batch_size
    step = stage.make_step(stage.model, args.device, "bf16")  # one optimizer for every size: its state does not grow
    while True:
        started = time.perf_counter()
        tried.append(_try_batch(step, stage, batch, args.device, context))
        if not tried[-1]["fits"]:
            stopped = "out of memory"
            break
        largest = batch
        attempt = time.perf_counter() - started
        if batch * 2 > args.max_batch_size:
            stopped = f"reached --max_batch_size {args.max_batch_size}"
            break
        if time.perf_counter() + 2.5 * attempt > deadline:
            stopped = "time budget: the next doubling would not finish in it"
            break
        batch *= 2
    return {"tried": tried, "largest_fitting": largest, "stopped_because": stopped}


def _try_batch(step: Callable, stage: Stage, batch: int, device: str, context: dict) -> dict:
    """One doubling attempt: a warm-up step, one for the peak memory and one timed; `fits: False` when it ran out
    of memory. The inputs and gradients are freed afterwards either way."""
    inputs = None
    try:
        inputs = _random_inputs(stage, batch, device)
        step(*inputs)  # warm-up (allocator growth, kernel choice)
        memory = _step_memory(lambda: step(*inputs), device)
        synchronize(device)
        timed_start = time.perf_counter()
        step(*inputs)
        synchronize(device)
        step_seconds = time.perf_counter() - timed_start
        return _rates(stage.flops_at(batch), step_seconds, batch, context) | memory | {"fits": True}
    except RuntimeError as error:  # OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(error):
            raise
        return {"batch_size": batch, "fits": False}
    finally:
        inputs = None
        for parameter in stage.model.parameters():
            parameter.grad = None
        free_memory(device)


def _random_inputs(stage: Stage, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random inputs for `stage`'s step: images and masks (stage 2) or two views (stage 1)."""
    config = stage.model.config
    size = config.image_size if stage.name == "stage2" else config.backbone_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    if stage.name == "stage2":
        return pixels, stage.model.mask_generator.batch(batch).to(device)
    return pixels, torch.randn_like(pixels)


def _is_out_of_memory(error: BaseException) -> bool:
    """The allocator's `OutOfMemoryError`, or a library's failed workspace allocation (cuBLAS, cuDNN)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "ALLOC_FAILED" in message)


__all__ = ["check_throughput"]
