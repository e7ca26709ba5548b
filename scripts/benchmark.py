#!/usr/bin/env python
"""Benchmark a MimCo stage-2 training step against its compute floor and a stock-transformers reference.

Everything runs in ONE process, with warm-up, interleaved repeats and medians, so the ratios compare like with like:

- `mimco_step`: a full MimCo step (student on the masked input, teacher, both losses, backward, AdamW step);
- `floor`: what such a step cannot avoid: the teacher forward plus the same student forward/backward/AdamW step
  with a trivial loss;
- `reference`: the same step assembled from stock `transformers` as a user would: a `ViTModel` student with
  `use_mask_token=True`, heads on every token, a `ViTModel` teacher under `torch.no_grad()`, the losses written
  plainly, `torch.optim.AdamW` with its defaults; same sizes and precision, same weights;
- `data`: decoding + stage-2 augmentation + mask collation of 224-px JPEGs in one process, ours against the pipeline
  of transformers' `run_mim.py` example (PIL + torchvision transforms + a NumPy mask generator).

Printed and written to JSON: images/s of each, `overhead = mimco_step / floor` (time), `speedup = reference /
mimco_step` (time, same precision), the best-settings speedup (ours with --best_precision against the reference in
fp32), data speedup and peak memory. Absolute times are for the record; the ratios are the result.

    python scripts/benchmark.py --model_preset vit-small-patch16 --batch_size 16          # CPU, ViT-S/16 at 224
    python scripts/benchmark.py --device cuda --precision bf16 --batch_size 128 --torch_compile
"""

from __future__ import annotations

import copy
import io
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import HfArgumentParser, ViTConfig, ViTModel

from modeling_mimco import MimCoConfig, MimCoForPreTraining, MimCoMaskGenerator
from modeling_mimco.data import (
    MimCoPretrainingCollator,
    PretrainingExampleTransform,
    build_pretraining_transform,
)
from modeling_mimco.training import MODEL_PRESETS, build_adamw


@dataclass
class BenchmarkArguments:
    model_preset: str = field(default="vit-small-patch16", metadata={"help": f"One of {sorted(MODEL_PRESETS)}."})
    image_size: int | None = field(default=None, metadata={"help": "Defaults to the preset's image size."})
    head_hidden_size: int = field(default=2048)
    batch_size: int = field(default=16)
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast) for the same-precision runs."})
    best_precision: str | None = field(
        default=None, metadata={"help": "Precision of ours in the best-settings run; default bf16 where supported."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile student and teacher (ours)."})
    warmup: int = field(default=2, metadata={"help": "Untimed steps before measuring each variant."})
    repeats: int = field(default=5, metadata={"help": "Timed rounds; each round runs every variant once."})
    data_images: int = field(default=64, metadata={"help": "JPEGs in the data benchmark (0 skips it)."})
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
        if self.timer not in ("wall", "cpu"):
            raise ValueError(f"--timer must be wall or cpu, got {self.timer!r}.")
        if self.batch_size <= 0 or self.repeats <= 0 or self.warmup < 0:
            raise ValueError("--batch_size and --repeats must be positive and --warmup non-negative.")


# --- models ------------------------------------------------------------------------------------------------------


def mimco_config(args: BenchmarkArguments) -> MimCoConfig:
    backbone = dict(MODEL_PRESETS[args.model_preset])
    if args.image_size is not None:
        backbone["image_size"] = args.image_size
    return MimCoConfig(**backbone, head_hidden_size=args.head_hidden_size, attn_implementation="sdpa")


def _vit_config(config: MimCoConfig) -> ViTConfig:
    return ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        hidden_act=config.hidden_act,
        attn_implementation="sdpa",
    )


def _copy_backbone_into_vit(source, vit: ViTModel) -> None:
    """Copies a MimCo backbone into a stock `ViTModel` (splitting the fused qkv), so both compute the same thing."""
    hidden = source.config.hidden_size
    with torch.no_grad():
        vit.embeddings.cls_token.copy_(source.embeddings.cls_token)
        vit.embeddings.position_embeddings.copy_(source.embeddings.position_embeddings)
        if vit.embeddings.mask_token is not None:
            vit.embeddings.mask_token.copy_(source.embeddings.mask_token)
        vit.embeddings.patch_embeddings.projection.load_state_dict(
            source.embeddings.patch_embeddings.projection.state_dict()
        )
        for ours, theirs in zip(source.layers, vit.layers):
            weight, bias = ours.attention.qkv.weight, ours.attention.qkv.bias
            for index, projection in enumerate(
                (theirs.attention.q_proj, theirs.attention.k_proj, theirs.attention.v_proj)
            ):
                projection.weight.copy_(weight[index * hidden : (index + 1) * hidden])
                if bias is not None:
                    projection.bias.copy_(bias[index * hidden : (index + 1) * hidden])
            theirs.attention.o_proj.load_state_dict(ours.attention.proj.state_dict())
            theirs.layernorm_before.load_state_dict(ours.layernorm_before.state_dict())
            theirs.layernorm_after.load_state_dict(ours.layernorm_after.state_dict())
            theirs.mlp.fc1.load_state_dict(ours.mlp.fc1.state_dict())
            theirs.mlp.fc2.load_state_dict(ours.mlp.fc2.state_dict())
        vit.layernorm.load_state_dict(source.layernorm.state_dict())


def _plain_head(head) -> torch.nn.Sequential:
    """The same MLP as a MimCo head, as an `nn.Sequential` with copied weights."""
    layers = [copy.deepcopy(head.fc2)]
    if head.fc1 is not None:
        layers = [copy.deepcopy(head.fc1), torch.nn.GELU(), copy.deepcopy(head.fc2)]
    return torch.nn.Sequential(*layers)


class ReferenceMimCo(torch.nn.Module):
    """MimCo written the plain way with stock `transformers` classes; the benchmark's outside reference."""

    def __init__(self, model: MimCoForPreTraining):
        super().__init__()
        config = model.config
        self.config = config
        self.student = ViTModel(_vit_config(config), add_pooling_layer=False, use_mask_token=True)
        self.teacher = ViTModel(_vit_config(config.get_teacher_config()), add_pooling_layer=False)
        _copy_backbone_into_vit(model.mimco, self.student)
        _copy_backbone_into_vit(model.teacher, self.teacher)
        self.teacher.requires_grad_(False).eval()

        self.patch_head = _plain_head(model.patch_head)
        self.image_head = _plain_head(model.image_head)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        tokens = self.student(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        with torch.no_grad():
            teacher_tokens = self.teacher(pixel_values).last_hidden_state
        # heads on every token, then the masked rows are picked out
        patch_predictions = F.normalize(self.patch_head(tokens[:, 1:]), dim=-1)
        teacher_patches = F.normalize(teacher_tokens[:, 1:], dim=-1)
        logits = torch.bmm(patch_predictions, teacher_patches.transpose(1, 2)) / self.config.patch_temperature
        targets = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        patch_loss = F.cross_entropy(logits[bool_masked_pos].float(), targets[bool_masked_pos])
        image_predictions = F.normalize(self.image_head(tokens[:, 0]), dim=-1)
        teacher_images = F.normalize(teacher_tokens[:, 0], dim=-1)
        image_logits = image_predictions @ teacher_images.T / self.config.image_temperature
        image_loss = F.cross_entropy(image_logits.float(), torch.arange(len(image_logits), device=logits.device))
        return patch_loss + image_loss


# --- steps -------------------------------------------------------------------------------------------------------


def _autocast(device: str, precision: str):
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_mimco_step(model: MimCoForPreTraining, device: str, precision: str) -> Callable:
    optimizer = build_adamw(model, 1e-4, 0.05, (0.9, 0.95))

    def step(pixel_values, bool_masked_pos):
        with _autocast(device, precision):
            loss = model(pixel_values, bool_masked_pos=bool_masked_pos).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_floor_step(model: MimCoForPreTraining, device: str, precision: str) -> Callable:
    student = model.mimco
    optimizer = build_adamw(student, 1e-4, 0.05, (0.9, 0.95))

    def step(pixel_values, bool_masked_pos):
        with _autocast(device, precision):
            with torch.inference_mode():
                model.teacher(**model.teacher_adapter.teacher_inputs(pixel_values))
            loss = student(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_reference_step(reference: ReferenceMimCo, device: str, precision: str) -> Callable:
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def step(pixel_values, bool_masked_pos):
        with _autocast(device, precision):
            loss = reference(pixel_values, bool_masked_pos)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable], inputs: tuple, device: str, warmup: int, repeats: int, timer: str = "wall"
) -> dict:
    """Median seconds per call of each step; rounds alternate between the steps so drifts hit all of them."""
    clock = time.process_time if timer == "cpu" else time.perf_counter
    for step in steps.values():
        for _ in range(warmup):
            step(*inputs)
    _synchronize(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize(device)
            start = clock()
            step(*inputs)
            _synchronize(device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def same_loss_check(model: MimCoForPreTraining, reference: ReferenceMimCo, inputs: tuple) -> tuple[float, float]:
    """Both implementations' losses on the same weights and inputs (the comparison is only fair if they agree)."""
    with torch.no_grad():
        ours = model(inputs[0], bool_masked_pos=inputs[1]).loss
        theirs = reference(*inputs)
    return float(ours), float(theirs)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# --- data --------------------------------------------------------------------------------------------------------


def make_jpegs(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        # smooth random colour fields compress like photographs, unlike white noise
        low = generator.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def run_mim_pipeline(image_size: int, mask_patch_size: int, patch_size: int, mask_ratio: float) -> Callable:
    """The data path of transformers' `run_mim.py` example: PIL decode, torchvision transforms, NumPy masks."""
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Lambda(lambda image: image.convert("RGB") if image.mode != "RGB" else image),
            T.RandomResizedCrop(image_size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    rand_size = image_size // mask_patch_size
    scale = mask_patch_size // patch_size
    token_count = rand_size**2
    mask_count = int(np.ceil(token_count * mask_ratio))

    def mask() -> np.ndarray:
        indices = np.random.permutation(token_count)[:mask_count]
        flat = np.zeros(token_count, dtype=int)
        flat[indices] = 1
        return flat.reshape((rand_size, rand_size)).repeat(scale, axis=0).repeat(scale, axis=1)

    def process(jpegs: list[bytes]) -> dict:
        pixel_values = torch.stack([transform(Image.open(io.BytesIO(data))) for data in jpegs])
        masks = torch.stack([torch.tensor(mask().flatten()) for _ in jpegs])
        return {"pixel_values": pixel_values, "bool_masked_pos": masks}

    return process


def mimco_pipeline(config: MimCoConfig) -> Callable:
    """The data path of `run_pretraining.py`."""
    example_transform = PretrainingExampleTransform(
        build_pretraining_transform(config.image_size, config.image_mean, config.image_std, normalize=False),
        image_column="image",
        draft_for=(config.image_size, 0.67),
    )
    collator = MimCoPretrainingCollator(
        MimCoMaskGenerator.from_config(config),
        image_size=config.image_size,
        normalize_with=(config.image_mean, config.image_std),
    )

    def process(jpegs: list[bytes]) -> dict:
        examples = example_transform({"image": [{"bytes": data, "path": None} for data in jpegs]})
        rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
        return collator(rows)

    return process


def benchmark_data(args: BenchmarkArguments, config: MimCoConfig) -> dict:
    """Images/s of both pipelines in one process, for JPEGs of each size in `--data_source_sizes`."""
    pipelines = {
        "mimco": mimco_pipeline(config),
        "run_mim": run_mim_pipeline(config.image_size, config.mask_patch_size, config.patch_size, config.mask_ratio),
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
    finally:
        torch.set_num_threads(threads)
    return results


# --- main --------------------------------------------------------------------------------------------------------


def _best_precision(args: BenchmarkArguments) -> str:
    if args.best_precision is not None:
        return args.best_precision
    if args.device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_supports_bf16() else "fp32"


def _cpu_supports_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run_benchmark(args: BenchmarkArguments) -> dict:
    torch.manual_seed(args.seed)
    device = args.device
    config = mimco_config(args)
    model = MimCoForPreTraining(config).to(device).train()
    reference = ReferenceMimCo(model).to(device).train()
    pixel_values = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)
    bool_masked_pos = model.mask_generator.batch(args.batch_size).to(device)
    inputs = (pixel_values, bool_masked_pos)
    ours_loss, reference_loss = same_loss_check(model, reference, inputs)

    steps = {
        "mimco_step": make_mimco_step(model, device, args.precision),
        "floor": make_floor_step(model, device, args.precision),
        "reference": make_reference_step(reference, device, args.precision),
    }
    best = _best_precision(args)
    compiled = None
    if args.torch_compile or best != args.precision:
        compiled = MimCoForPreTraining(config).to(device).train()
        compiled.load_state_dict(model.state_dict())
        if args.torch_compile:
            compiled.mimco.compile()
            compiled.teacher.compile()
        steps["mimco_best"] = make_mimco_step(compiled, device, best)
        steps["reference_fp32"] = (
            steps["reference"] if args.precision == "fp32" else make_reference_step(reference, device, "fp32")
        )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_interleaved(steps, inputs, device, args.warmup, args.repeats, args.timer)

    result = {
        "settings": asdict(args) | {"best_precision": best, "torch_version": torch.__version__},
        "same_weights_loss": {"mimco": ours_loss, "reference": reference_loss},
        "seconds_per_step": seconds,
        "images_per_second": {name: args.batch_size / value for name, value in seconds.items()},
        "overhead": seconds["mimco_step"] / seconds["floor"],
        "speedup": seconds["reference"] / seconds["mimco_step"],
        "peak_memory_mb": peak_memory_mb(device),
    }
    if "mimco_best" in seconds:
        result["best_settings_speedup"] = seconds["reference_fp32"] / seconds["mimco_best"]
    if args.data_images > 0:
        result["data"] = benchmark_data(args, config)
    return result


def format_report(result: dict) -> str:
    lines = [f"{'variant':<16}{'images/s':>12}{'s/step':>10}   ({result['settings']['timer']} time)"]
    for name, value in result["images_per_second"].items():
        lines.append(f"{name:<16}{value:>12.1f}{result['seconds_per_step'][name]:>10.4f}")
    lines.append(f"overhead (mimco_step / floor, lower is better): {result['overhead']:.3f}")
    lines.append(f"speedup (reference / mimco_step, same precision): {result['speedup']:.3f}")
    if "best_settings_speedup" in result:
        lines.append(
            f"best-settings speedup (reference fp32 / ours {result['settings']['best_precision']}"
            f"{' + compile' if result['settings']['torch_compile'] else ''}): {result['best_settings_speedup']:.3f}"
        )
    for source_size, data in result.get("data", {}).items():
        lines.append(
            f"data, one process, {source_size} JPEGs: ours {data['mimco_images_per_second']:.1f} images/s, "
            f"run_mim.py {data['run_mim_images_per_second']:.1f} images/s, speedup {data['speedup']:.2f}"
        )
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MiB")
    losses = result["same_weights_loss"]
    lines.append(
        f"same weights, same inputs: loss {losses['mimco']:.6f} (ours) vs {losses['reference']:.6f} (reference)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(BenchmarkArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available.")
    except ValueError as error:
        parser.error(str(error))
    result = run_benchmark(args)
    print(format_report(result))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
