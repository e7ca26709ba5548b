"""Benchmark a MimCo stage-2 training step against its compute floor, a stock-transformers reference and the
machine's own large-GEMM rate.

Everything runs in ONE process, with warm-up, interleaved repeats and medians, so the ratios compare like with like:

- `mimco_step`: a full MimCo step (student on the masked input, teacher, both losses, backward, AdamW step);
- `floor`: what such a step cannot avoid: the teacher forward plus the same student forward/backward/AdamW step
  with a trivial loss;
- `reference`: the same step assembled from stock `transformers` as a user would: a `ViTModel` student with
  `use_mask_token=True`, heads on every token, a `ViTModel` teacher under `torch.no_grad()`, the losses written
  plainly, `torch.optim.AdamW` with its defaults; same sizes and precision, same weights;
- `mimco_teacher_bf16` / `mimco_teacher_autocast` (fp32 runs, `--teacher_bf16`): the student in fp32, the frozen
  teacher in bf16: its weights and inputs cast to bf16, or its fp32 weights under bf16 autocast; its tokens are cast
  back to fp32 before the heads and the losses. The loss change against fp32 is measured on the same weights;
- `mimco_best` / `reference_fp32`: ours at `--best_precision` (and compiled with `--torch_compile`, then beside
  `mimco_best_eager`, the same precision uncompiled) against the reference in fp32;
- `gemm_fp32` / `gemm_bf16`: one large matrix product (`--gemm_size` cubed), timed in the same rounds: the
  machine's limit in each precision. Each variant's FLOPs utilisation is its model FLOPs/s over the GEMM rate of
  the precision its parts run in (FLOPs counted as in docs/benchmarks.md, `modeling_mimco.benchmarks.measurement`);
- `data`: decoding + stage-2 augmentation + mask collation of generated JPEGs in one process, ours against the
  pipeline of transformers' `run_mim.py` example (PIL + torchvision transforms + a NumPy mask generator).

Printed and written to JSON: images/s of each, `overhead = mimco_step / floor` (time), `speedup = reference /
mimco_step` (time, same precision), the best-settings speedup, FLOPs utilisation, the bf16-teacher speedup and loss
change, data speedup and peak memory. Absolute times are for the record; the ratios are the result.

    OMP_NUM_THREADS=1 python scripts/benchmark.py --model_preset vit-small-patch16 --batch_size 16 --timer cpu
    python scripts/benchmark.py --device cuda --precision bf16 --batch_size 128 --torch_compile
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser

from modeling_mimco import MimCoConfig, MimCoForPreTraining
from modeling_mimco.benchmarks.measurement import (
    ReferenceMimCo,
    contrastive_pipeline,
    cpu_supports_bf16,
    floor_step_flops,
    make_floor_step,
    make_gemm_step,
    make_jpegs,
    make_mimco_step,
    make_reference_step,
    mimco_pipeline,
    mimco_step_flops,
    peak_memory_mb,
    run_mim_pipeline,
    same_loss_check,
    synchronize,
    time_interleaved,
    use_low_precision_teacher,
    utilisation,
)
from modeling_mimco.configuration_mimco import MODEL_PRESETS


__all__ = ["BenchmarkArguments", "MimCoForPreTraining", "ReferenceMimCo", "main", "mimco_config", "same_loss_check"]


@dataclass
class BenchmarkArguments:
    model_preset: str = field(default="vit-small-patch16", metadata={"help": f"One of {sorted(MODEL_PRESETS)}."})
    image_size: int | None = field(default=None, metadata={"help": "Defaults to the preset's image size."})
    head_hidden_size: int = field(default=2048)
    boolean_index_variant: bool = field(
        default=False,
        metadata={
            "help": "Also time `mimco_step_boolean_index`: the same step through the general path (masked tokens "
            "picked by a boolean index, the patch loss on the flattened rows) that masks of varying counts take."
        },
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata={
            "help": "Stochastic depth of the student. Above 0, `mimco_step_seeded` (drop path drawn from per-image "
            "seeds, as the training commands do) is timed beside `mimco_step` (torch's generator)."
        },
    )
    batch_size: int = field(default=16)
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast) for the same-precision runs."})
    best_precision: str | None = field(
        default=None, metadata={"help": "Precision of ours in the best-settings run; default bf16 where supported."}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the whole model (ours), as the training commands do."}
    )
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile's mode for --torch_compile (default, reduce-overhead, ...)."}
    )
    teacher_bf16: bool = field(
        default=True,
        metadata={"help": "In fp32 runs, also time the student in fp32 with the frozen teacher in bf16."},
    )
    gemm_size: int | None = field(
        default=None,
        metadata={"help": "Side of the GEMM that measures the limit (default 2048 on CPU, 8192 on CUDA)."},
    )
    warmup: int = field(default=2, metadata={"help": "Untimed steps before measuring each variant."})
    repeats: int = field(default=5, metadata={"help": "Timed rounds; each round runs every variant once."})
    data_images: int = field(default=64, metadata={"help": "JPEGs in the data benchmark (0 skips it)."})
    data_only: bool = field(default=False, metadata={"help": "Only the data benchmark (no training steps)."})
    data_source_sizes: str = field(
        default="224x224,500x375,1024x768", metadata={"help": "Comma-separated WxH of the generated JPEGs."}
    )
    timer: str = field(
        default="wall",
        metadata={
            "help": "wall (elapsed time) or cpu (this process's CPU time: steadier on a shared machine; use it with "
            "one thread, OMP_NUM_THREADS=1, so that no thread spins while it waits)."
        },
    )
    output_json: str | None = field(default=None, metadata={"help": "Where to write the results."})
    seed: int = field(default=0)

    def __post_init__(self):
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"--model_preset must be one of {sorted(MODEL_PRESETS)}, got {self.model_preset!r}.")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}.")
        if self.best_precision not in (None, "fp32", "bf16"):
            raise ValueError(f"--best_precision must be fp32 or bf16, got {self.best_precision!r}.")
        if self.timer not in ("wall", "cpu"):
            raise ValueError(f"--timer must be wall or cpu, got {self.timer!r}.")
        if self.batch_size <= 0 or self.repeats <= 0 or self.warmup < 0:
            raise ValueError("--batch_size and --repeats must be positive and --warmup non-negative.")
        if self.gemm_size is not None and self.gemm_size <= 0:
            raise ValueError(f"--gemm_size must be positive, got {self.gemm_size}.")


def mimco_config(args: BenchmarkArguments) -> MimCoConfig:
    backbone = dict(MODEL_PRESETS[args.model_preset])
    if args.image_size is not None:
        backbone["image_size"] = args.image_size
    return MimCoConfig(
        **backbone,
        head_hidden_size=args.head_hidden_size,
        drop_path_rate=args.drop_path_rate,
        attn_implementation="sdpa",
    )


# --- the bf16 teacher ---------------------------------------------------------------------------------------------


def teacher_bf16_loss_change(model: MimCoForPreTraining, inputs: tuple, mode: str) -> dict:
    """Losses of the fp32 model and of a copy with a bf16 teacher (`mode` as in `use_low_precision_teacher`) on the
    same weights, inputs and mask, and how far the teacher's normalised targets moved."""
    low = MimCoForPreTraining(model.config).to(inputs[0].device).train()
    low.load_state_dict(model.state_dict())
    use_low_precision_teacher(low, mode)
    with torch.no_grad():
        exact = model(inputs[0], bool_masked_pos=inputs[1])
        approx = low(inputs[0], bool_masked_pos=inputs[1])
        exact_cls, exact_patches = model.teacher_features(inputs[0])
        approx_cls, approx_patches = low.teacher_features(inputs[0])
    exact_targets = torch.nn.functional.normalize(torch.cat([exact_cls[:, None], exact_patches], 1), dim=-1)
    approx_targets = torch.nn.functional.normalize(torch.cat([approx_cls[:, None], approx_patches], 1), dim=-1)
    cosine = (exact_targets * approx_targets).sum(-1)
    result = {
        "loss_fp32": float(exact.loss),
        "loss_teacher_bf16": float(approx.loss),
        "loss_abs_difference": abs(float(exact.loss) - float(approx.loss)),
        "loss_relative_difference": abs(float(exact.loss) - float(approx.loss)) / abs(float(exact.loss)),
        "target_min_cosine": float(cosine.min()),
        "target_max_abs_difference": float((exact_targets - approx_targets).abs().max()),
    }
    for part in ("patch_loss", "image_loss"):
        if getattr(exact, part) is not None:
            result[f"{part}_abs_difference"] = abs(float(getattr(exact, part)) - float(getattr(approx, part)))
    return result


# --- data --------------------------------------------------------------------------------------------------------


def benchmark_data(args: BenchmarkArguments, config: MimCoConfig) -> dict:
    """Images/s per core of the loaders in one process, for JPEGs of each size in `--data_source_sizes`: stage 2
    (ours against `run_mim.py`'s) and stage 1 (ours, the loader's share with `--augment_on_device`, and
    torchvision's v2 transforms of MoCo v3's recipe)."""
    pipelines = {
        "mimco": mimco_pipeline(config),
        "run_mim": run_mim_pipeline(config.image_size, config.mask_patch_size, config.patch_size, config.mask_ratio),
        "stage1": contrastive_pipeline(config, "ours"),
        "stage1_photometric_on_device": contrastive_pipeline(config, "ours_photometric_on_device"),
        "stage1_torchvision": contrastive_pipeline(config, "torchvision"),
    }
    results = {}
    # a DataLoader worker runs its pipeline on one thread, so that is what is measured
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for source_size in args.data_source_sizes.split(","):
            width, height = (int(v) for v in source_size.split("x"))
            jpegs = make_jpegs(args.data_images, (width, height), args.seed)
            timings = time_interleaved(
                pipelines, (jpegs,), "cpu", warmup=1, repeats=max(args.repeats, 3), timer=args.timer
            )
            results[source_size] = {f"{name}_images_per_second": len(jpegs) / t for name, t in timings.items()}
            results[source_size]["speedup"] = timings["run_mim"] / timings["mimco"]
            results[source_size]["stage1_speedup"] = timings["stage1_torchvision"] / timings["stage1"]
    finally:
        torch.set_num_threads(threads)
    return results


# --- main --------------------------------------------------------------------------------------------------------


def _best_precision(args: BenchmarkArguments) -> str:
    if args.best_precision is not None:
        return args.best_precision
    if args.device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


@dataclass
class Variants:
    """The timed steps by name, the (student, teacher) precision of each for its utilisation, and the loss changes
    of the bf16-teacher variants."""

    steps: dict[str, Callable] = field(default_factory=dict)
    precisions: dict[str, tuple[str, str]] = field(default_factory=dict)
    teacher_bf16: dict[str, dict] = field(default_factory=dict)
    compile_seconds: float | None = None  # the compiled variant's first step, compilation included

    def add(self, name: str, step: Callable, student: str, teacher: str | None = None) -> None:
        self.steps[name] = step
        self.precisions[name] = (student, teacher or student)


def copy_of(model: MimCoForPreTraining, device: str) -> MimCoForPreTraining:
    """A new model with `model`'s weights, in training mode on `device`."""
    copy = MimCoForPreTraining(model.config).to(device).train()
    copy.load_state_dict(model.state_dict())
    return copy


def build_variants(
    args: BenchmarkArguments, model: MimCoForPreTraining, reference: ReferenceMimCo, inputs: tuple, best: str
) -> Variants:
    """Ours, the floor and the reference at `--precision`; with `--teacher_bf16` in fp32 the bf16-teacher variants;
    and the best-settings variants when `best` differs from `--precision` or with `--torch_compile`."""
    device, precision = args.device, args.precision
    variants = Variants()
    variants.add("mimco_step", make_mimco_step(model, device, precision), precision)
    variants.add("floor", make_floor_step(model, device, precision), precision)
    variants.add("reference", make_reference_step(reference, device, precision), precision)
    if args.boolean_index_variant:
        general = copy_of(model, device)
        general.masked_positions = lambda bool_masked_pos: None  # as for a mask of varying counts
        variants.add("mimco_step_boolean_index", make_mimco_step(general, device, precision), precision)
    if args.drop_path_rate > 0:
        sample_seeds = torch.arange(args.batch_size, device=device) * 7919
        seeded = make_mimco_step(copy_of(model, device), device, precision, sample_seeds)
        variants.add("mimco_step_seeded", seeded, precision)
    if args.teacher_bf16 and precision == "fp32":
        for mode, name in (("cast", "mimco_teacher_bf16"), ("autocast", "mimco_teacher_autocast")):
            low = use_low_precision_teacher(copy_of(model, device), mode)
            variants.add(name, make_mimco_step(low, device, "fp32"), "fp32", "bf16")
            variants.teacher_bf16[name] = teacher_bf16_loss_change(model, inputs, mode)
    if args.torch_compile or best != precision:
        compiled = copy_of(model, device)
        if args.torch_compile:
            # the whole model in place, as mimco-pretrain's --torch_compile does: one graph (static shapes)
            compiled.compile(mode=args.torch_compile_mode)
            variants.add("mimco_best_eager", make_mimco_step(copy_of(model, device), device, best), best)
        variants.add("mimco_best", make_mimco_step(compiled, device, best), best)
        if args.torch_compile:
            # the first call compiles: timed on its own, before the interleaved rounds
            started = time.perf_counter()
            variants.steps["mimco_best"](*inputs)
            synchronize(device)
            variants.compile_seconds = time.perf_counter() - started
        fp32_reference = (
            variants.steps["reference"] if precision == "fp32" else make_reference_step(reference, device, "fp32")
        )
        variants.add("reference_fp32", fp32_reference, "fp32")
    return variants


def add_gemm_steps(steps: dict[str, Callable], device: str, gemm_size: int) -> dict[str, float]:
    """Adds `gemm_fp32` and `gemm_bf16`, the machine's limit in each precision, timed in the same rounds as the
    steps; returns the FLOPs of one call of each."""
    gemm_flops = {}
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        steps[f"gemm_{precision}"], gemm_flops[precision] = make_gemm_step(device, dtype, gemm_size)
    return gemm_flops


def run_benchmark(args: BenchmarkArguments) -> dict:
    """Builds the model, the reference and the variants, times them in one interleaved run and returns every
    figure (and the data benchmark's, unless `--data_images 0`)."""
    torch.manual_seed(args.seed)
    device = args.device
    config = mimco_config(args)
    if args.data_only:
        return {"settings": asdict(args) | {"torch_version": torch.__version__}, "data": benchmark_data(args, config)}
    model = MimCoForPreTraining(config).to(device).train()
    reference = ReferenceMimCo(model).to(device).train()
    pixel_values = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)
    bool_masked_pos = model.mask_generator.batch(args.batch_size).to(device)
    inputs = (pixel_values, bool_masked_pos)
    losses = same_loss_check(model, reference, inputs)
    best = _best_precision(args)
    variants = build_variants(args, model, reference, inputs, best)
    gemm_size = args.gemm_size or (8192 if device == "cuda" else 2048)
    gemm_flops = add_gemm_steps(variants.steps, device, gemm_size)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_interleaved(variants.steps, inputs, device, args.warmup, args.repeats, args.timer)
    gemm_rate = {precision: gemm_flops[precision] / seconds.pop(f"gemm_{precision}") for precision in gemm_flops}
    settings = asdict(args) | {"best_precision": best, "gemm_size": gemm_size, "torch_version": torch.__version__}
    result = {"settings": settings} | summarise(args, config, variants, seconds, gemm_rate, losses)
    if args.data_images > 0:
        result["data"] = benchmark_data(args, config)
    return result


def summarise(
    args: BenchmarkArguments,
    config: MimCoConfig,
    variants: Variants,
    seconds: dict[str, float],
    gemm_rate: dict[str, float],
    losses: tuple[float, float],
) -> dict:
    """The figures of the timed steps: images/s, the ratios, model FLOPs, their utilisation of the GEMM rate of
    each variant's precisions, peak memory, and the best-settings, compile and bf16-teacher speedups."""
    step_flops = {name: mimco_step_flops(config, args.batch_size) for name in seconds}
    step_flops["floor"] = floor_step_flops(config, args.batch_size)
    precisions = variants.precisions
    result = {
        "same_weights_loss": {"mimco": losses[0], "reference": losses[1]},
        "seconds_per_step": seconds,
        "images_per_second": {name: args.batch_size / value for name, value in seconds.items()},
        "overhead": seconds["mimco_step"] / seconds["floor"],
        "speedup": seconds["reference"] / seconds["mimco_step"],
        "gemm_flops_per_second": gemm_rate,
        "model_flops_per_step": {name: flops.total for name, flops in step_flops.items()},
        "model_flops_per_second": {name: step_flops[name].total / value for name, value in seconds.items()},
        "flops_utilisation": {
            name: utilisation(step_flops[name], value, gemm_rate[precisions[name][0]], gemm_rate[precisions[name][1]])
            for name, value in seconds.items()
        },
        "variant_precision": {name: {"student": s, "teacher": t} for name, (s, t) in precisions.items()},
        "peak_memory_mb": peak_memory_mb(args.device),
    }
    if "mimco_step_boolean_index" in seconds:
        result["static_shape_speedup"] = seconds["mimco_step_boolean_index"] / seconds["mimco_step"]
    if variants.compile_seconds is not None:
        result["compile_seconds"] = variants.compile_seconds
    if "mimco_step_seeded" in seconds:
        result["seeded_drop_path_cost"] = seconds["mimco_step_seeded"] / seconds["mimco_step"]
    if "mimco_best" in seconds:
        result["best_settings_speedup"] = seconds["reference_fp32"] / seconds["mimco_best"]
    if "mimco_best_eager" in seconds:
        result["compile_speedup"] = seconds["mimco_best_eager"] / seconds["mimco_best"]
    if variants.teacher_bf16:
        for name, change in variants.teacher_bf16.items():
            change["speedup"] = seconds["mimco_step"] / seconds[name]
        result["teacher_bf16"] = variants.teacher_bf16
    return result


def format_report(result: dict) -> str:
    settings = result["settings"]
    if settings.get("data_only"):
        return "\n".join(_data_lines(result))
    lines = [
        f"{'variant':<24}{'images/s':>10}{'s/step':>10}{'GFLOP/s':>10}{'util.':>8}   ({settings['timer']} time; "
        "util. = model FLOPs/s over the measured GEMM rate of its precision)"
    ]
    for name, value in result["images_per_second"].items():
        lines.append(
            f"{name:<24}{value:>10.1f}{result['seconds_per_step'][name]:>10.4f}"
            f"{result['model_flops_per_second'][name] / 1e9:>10.1f}{result['flops_utilisation'][name]:>8.3f}"
        )
    rates = ", ".join(
        f"{precision} {rate / 1e9:.1f} GFLOP/s" for precision, rate in result["gemm_flops_per_second"].items()
    )
    lines.append(f"large GEMM ({settings['gemm_size']}^3), same rounds: {rates}")
    lines.append(f"overhead (mimco_step / floor, lower is better): {result['overhead']:.3f}")
    lines.append(f"speedup (reference / mimco_step, same precision): {result['speedup']:.3f}")
    if "best_settings_speedup" in result:
        lines.append(
            f"best-settings speedup (reference fp32 / ours {settings['best_precision']}"
            f"{' + compile' if settings['torch_compile'] else ''}): {result['best_settings_speedup']:.3f}"
        )
    if "static_shape_speedup" in result:
        lines.append(
            f"static shapes (mimco_step_boolean_index / mimco_step, higher is better): {result['static_shape_speedup']:.3f}"
        )
    if "compile_seconds" in result:
        lines.append(f"compilation (first step of mimco_best): {result['compile_seconds']:.1f} s")
    if "seeded_drop_path_cost" in result:
        lines.append(
            f"seeded drop path (mimco_step_seeded / mimco_step, drop path {settings['drop_path_rate']}): "
            f"{result['seeded_drop_path_cost']:.3f}"
        )
    if "compile_speedup" in result:
        lines.append(f"torch.compile speedup (mimco_best_eager / mimco_best): {result['compile_speedup']:.3f}")
    for name, change in result.get("teacher_bf16", {}).items():
        lines.append(
            f"{name}: speedup over mimco_step {change['speedup']:.3f}, loss {change['loss_teacher_bf16']:.6f} vs "
            f"{change['loss_fp32']:.6f} fp32 (relative difference {change['loss_relative_difference']:.2e}), "
            f"normalised targets min cosine {change['target_min_cosine']:.6f}"
        )
    lines += _data_lines(result)
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MiB")
    losses = result["same_weights_loss"]
    lines.append(
        f"same weights, same inputs: loss {losses['mimco']:.6f} (ours) vs {losses['reference']:.6f} (reference)"
    )
    return "\n".join(lines)


def _data_lines(result: dict) -> list[str]:
    lines = []
    for source_size, data in result.get("data", {}).items():
        lines.append(
            f"data, one process, {source_size} JPEGs: stage 2 ours {data['mimco_images_per_second']:.1f} images/s, "
            f"run_mim.py {data['run_mim_images_per_second']:.1f} images/s, speedup {data['speedup']:.2f}; stage 1 "
            f"ours {data['stage1_images_per_second']:.1f} images/s (photometric on the device: "
            f"{data['stage1_photometric_on_device_images_per_second']:.1f}), torchvision v2 "
            f"{data['stage1_torchvision_images_per_second']:.1f} images/s, speedup {data['stage1_speedup']:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(BenchmarkArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available.")
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()
    result = run_benchmark(args)
    result["wall_seconds"] = time.perf_counter() - started
    print(format_report(result))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def cli() -> int:
    """The console entry point: `main` on the process's arguments; 0 once the report is written."""
    main(sys.argv[1:])
    return 0
