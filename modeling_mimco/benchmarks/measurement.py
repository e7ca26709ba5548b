"""Measuring MimCo's training steps: the stock-transformers reference, step builders, timers, FLOP counts, the
machine's large-GEMM rate and the data pipelines of the data benchmark.

Shared by `scripts/benchmark.py` (the CPU benchmark) and `modeling_mimco.benchmarks.gpu_check` (the GPU check kit, which keeps
the GPUs' datasheet peaks). Nothing here is imported by the model files; it needs only torch, transformers,
torchvision, NumPy and PIL (all dependencies of the package).

FLOPs are counted as in docs/benchmarks.md: matrix products only (a multiply-add is 2 FLOPs), a backward pass costs
twice its forward (so a trained module costs 3x its forward), LayerNorm, softmax, activations and the optimizer are
not counted. These are *model* FLOPs: the work the method needs, whatever an implementation actually executes, so
that model FLOPs utilisation compares implementations of the same step fairly.
"""

from __future__ import annotations

import copy
import io
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig, ViTModel

from modeling_mimco.configuration_mimco import MimCoConfig, MimCoContrastiveConfig
from modeling_mimco.interop.vit_export import vit_shape_kwargs
from modeling_mimco.modeling_mimco import MimCoForPreTraining
from modeling_mimco.modeling_mimco_contrastive import MimCoForContrastivePreTraining
from modeling_mimco.training.optimization import build_adamw


# --- the stock-transformers reference -----------------------------------------------------------------------------


def vit_config_like(config: MimCoConfig) -> ViTConfig:
    """A `transformers.ViTConfig` of the same shape as a MimCo backbone (SDPA attention)."""
    return ViTConfig(**vit_shape_kwargs(config), hidden_act=config.hidden_act, attn_implementation="sdpa")


def copy_backbone_into_vit(source, vit: ViTModel) -> None:
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
    """MimCo written the plain way with stock `transformers` classes; the benchmarks' outside reference.

    A `ViTModel` student with `use_mask_token=True`, heads on every token (the masked rows are picked afterwards), a
    `ViTModel` teacher under `torch.no_grad()`, the losses written plainly. Built from a `MimCoForPreTraining`
    whose weights it copies, so both compute the same loss.
    """

    def __init__(self, model: MimCoForPreTraining):
        super().__init__()
        config = model.config
        self.config = config
        self.student = ViTModel(vit_config_like(config), add_pooling_layer=False, use_mask_token=True)
        self.teacher = ViTModel(vit_config_like(config.get_teacher_config()), add_pooling_layer=False)
        copy_backbone_into_vit(model.mimco, self.student)
        copy_backbone_into_vit(model.teacher, self.teacher)
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


def same_loss_check(model: MimCoForPreTraining, reference: ReferenceMimCo, inputs: tuple) -> tuple[float, float]:
    """Both implementations' losses on the same weights and inputs (the comparison is only fair if they agree), in
    evaluation mode: the reference has no stochastic depth to match a `--drop_path_rate`."""
    was_training = model.training
    model.eval(), reference.eval()
    with torch.no_grad():
        ours = model(inputs[0], bool_masked_pos=inputs[1]).loss
        theirs = reference(*inputs)
    model.train(was_training), reference.train(was_training)
    return float(ours), float(theirs)


# --- steps --------------------------------------------------------------------------------------------------------


def autocast(device: str, precision: str):
    """bf16 autocast for `precision == "bf16"`, a disabled autocast (a no-op context) otherwise."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_mimco_step(
    model: MimCoForPreTraining, device: str, precision: str, sample_seeds: torch.Tensor | None = None
) -> Callable:
    """A full stage-2 step: forward (student, teacher, heads, losses), backward and the fused AdamW step; with
    `sample_seeds`, stochastic depth and dropout are drawn from them, as the training commands do."""
    optimizer = build_adamw(model, 1e-4, 0.05, (0.9, 0.95))

    def step(pixel_values, bool_masked_pos):
        with autocast(device, precision):
            loss = model(pixel_values, bool_masked_pos=bool_masked_pos, sample_seeds=sample_seeds).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_floor_step(model: MimCoForPreTraining, device: str, precision: str) -> Callable:
    """What a stage-2 step cannot avoid: the teacher forward plus the student's forward/backward/AdamW step with a
    trivial loss (no heads, no InfoNCE)."""
    student = model.mimco
    optimizer = build_adamw(student, 1e-4, 0.05, (0.9, 0.95))

    def step(pixel_values, bool_masked_pos):
        with autocast(device, precision):
            with torch.inference_mode():
                model.teacher(**model.teacher_adapter.teacher_inputs(pixel_values))
            loss = student(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_reference_step(reference: ReferenceMimCo, device: str, precision: str) -> Callable:
    """The reference's step, with `torch.optim.AdamW` at its defaults, as a user of stock transformers writes it."""
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def step(pixel_values, bool_masked_pos):
        with autocast(device, precision):
            loss = reference(pixel_values, bool_masked_pos)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def use_low_precision_teacher(model: MimCoForPreTraining, mode: str = "cast") -> MimCoForPreTraining:
    """Runs `model`'s frozen teacher in bf16 while the student keeps its precision (benchmark-only).

    `mode="cast"`: the teacher's weights and its inputs are cast to bf16; `mode="autocast"`: the teacher keeps its
    float32 weights and runs under bf16 autocast. Either way the teacher's tokens are cast back to float32 before
    the heads and losses, which L2-normalise them. Patches the instance's `teacher_features` (the one place the
    forward reads the teacher) and returns `model`.
    """
    if mode not in ("cast", "autocast"):
        raise ValueError(f"`mode` must be 'cast' or 'autocast', got {mode!r}.")
    if mode == "cast":
        model.teacher.to(torch.bfloat16)

    def teacher_features(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            # re-normalise (and resize) in float32, then cast: only the teacher's own arithmetic is in bf16
            inputs = model.teacher_adapter.teacher_inputs(pixel_values)
            if mode == "cast":
                inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
                tokens = model.teacher(**inputs).last_hidden_state
            else:
                with torch.autocast(device_type=pixel_values.device.type, dtype=torch.bfloat16):
                    tokens = model.teacher(**inputs).last_hidden_state
        return model.teacher_adapter.split_tokens(tokens.float())

    model.teacher_features = teacher_features
    return model


def make_contrastive_step(model: MimCoForContrastivePreTraining, device: str, precision: str) -> Callable:
    """A stage-1 (MoCo v3) step on two views: queries, the momentum EMA update, keys, both losses, AdamW."""
    optimizer = build_adamw(model, 1e-4, 0.1, (0.9, 0.95))

    def step(pixel_values_1, pixel_values_2):
        with autocast(device, precision):
            loss = model(pixel_values_1=pixel_values_1, pixel_values_2=pixel_values_2, momentum=0.99).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


# --- timing -------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable],
    inputs: tuple,
    device: str,
    warmup: int,
    repeats: int,
    timer: str = "wall",
    deadline: float | None = None,
) -> dict[str, float]:
    """Median seconds per call of each step; rounds alternate between the steps so drifts hit all of them.

    `timer="cpu"` counts this process's CPU time (steady on a shared machine with one thread); `"wall"` elapsed
    time. With a `deadline` (a `time.perf_counter()` value) no new round starts after it, but at least one runs.
    """
    clock = time.process_time if timer == "cpu" else time.perf_counter
    for step in steps.values():
        for _ in range(warmup):
            step(*inputs)
    synchronize(device)
    times = {name: [] for name in steps}
    for round_index in range(repeats):
        if round_index > 0 and deadline is not None and time.perf_counter() > deadline:
            break
        for name, step in steps.items():
            synchronize(device)
            start = clock()
            step(*inputs)
            synchronize(device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_mb(device: str) -> float:
    """The CUDA allocator's peak since its last reset, or this process's peak resident size on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# --- FLOPs --------------------------------------------------------------------------------------------------------


def vit_forward_flops(config, batch_size: int, image_size: int | None = None) -> float:
    """Matrix-product FLOPs of one ViT forward (patch embedding, qkv, attention, projection, MLP) on a batch.

    `config` is any ViT-like config with `patch_size`, `hidden_size`, `num_hidden_layers` and `intermediate_size`
    (or `mlp_ratio`): a `MimCoConfig`, a `ViTConfig`, a `Dinov2Config`. Register tokens are not counted.
    """
    image_size = image_size or config.image_size
    patch_size = config.patch_size
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or int(hidden * getattr(config, "mlp_ratio", 4))
    embedding = 2 * patches * getattr(config, "num_channels", 3) * patch_size**2 * hidden
    per_layer = (
        2 * tokens * hidden * 3 * hidden  # fused qkv
        + 2 * 2 * tokens * tokens * hidden  # q @ k^T and attention @ v
        + 2 * tokens * hidden * hidden  # output projection
        + 2 * 2 * tokens * hidden * intermediate  # MLP
    )
    return float(batch_size * (embedding + config.num_hidden_layers * per_layer))


def _head_flops(rows: float, in_features: int, hidden: int, out_features: int) -> float:
    if hidden > 0:
        return 2.0 * rows * (in_features * hidden + hidden * out_features)
    return 2.0 * rows * in_features * out_features


@dataclass
class StepFlops:
    """Model FLOPs of one training step, split by the precision each part may run in."""

    student: float  # trained parts, 3x forward
    teacher: float  # frozen parts run forward only

    @property
    def total(self) -> float:
        return self.student + self.teacher


def mimco_step_flops(config: MimCoConfig, batch_size: int, num_masked: int | None = None) -> StepFlops:
    """Model FLOPs of one stage-2 step: student forward+backward, heads on the masked patches and the CLS tokens,
    the InfoNCE logits, and the teacher's forward."""
    teacher_config = config.get_teacher_config()
    patches = (config.image_size // config.patch_size) ** 2
    if num_masked is None:  # the random mask generator's count: whole blocks, ceil(ratio x blocks) of them
        blocks = (config.image_size // config.mask_patch_size) ** 2
        patches_per_block = (config.mask_patch_size // config.patch_size) ** 2
        num_masked = batch_size * math.ceil(blocks * config.mask_ratio) * patches_per_block
    teacher_dim = teacher_config.hidden_size
    trained = vit_forward_flops(config, batch_size)
    if config.patch_loss_weight > 0:
        trained += _head_flops(num_masked, config.hidden_size, config.head_hidden_size, teacher_dim)
        negatives = patches if config.patch_negatives == "image" else batch_size * patches
        trained += 2.0 * num_masked * negatives * teacher_dim
    if config.image_loss_weight > 0:
        trained += _head_flops(batch_size, config.hidden_size, config.head_hidden_size, teacher_dim)
        trained += 2.0 * batch_size * batch_size * teacher_dim
    # the teacher sees the student's patch grid (its input is resized to match, see `TeacherInputAdapter`)
    teacher_image_size = config.image_size // config.patch_size * teacher_config.patch_size
    teacher = vit_forward_flops(teacher_config, batch_size, teacher_image_size)
    return StepFlops(student=3.0 * trained, teacher=teacher)


def floor_step_flops(config: MimCoConfig, batch_size: int) -> StepFlops:
    """Model FLOPs of the floor step: the student's forward+backward and the teacher's forward."""
    full = mimco_step_flops(config, batch_size)
    return StepFlops(student=3.0 * vit_forward_flops(config, batch_size), teacher=full.teacher)


def contrastive_step_flops(config: MimCoContrastiveConfig, batch_size: int) -> StepFlops:
    """Model FLOPs of one stage-1 step on two views of `batch_size` images: base encoder, projector and predictor
    forward+backward, the momentum encoder and projector forward, and both InfoNCE logits."""
    backbone = config.backbone_config
    hidden, projector, projection = backbone.hidden_size, config.projector_hidden_size, config.projection_size
    views = 2 * batch_size
    projector_flops = 2.0 * views * (hidden * projector + projector * projector + projector * projection)
    predictor_flops = 2.0 * views * (projection * projector + projector * projection)
    logits = 2 * 2.0 * batch_size * batch_size * projection
    trained = vit_forward_flops(backbone, views) + projector_flops + predictor_flops + logits
    return StepFlops(student=3.0 * trained, teacher=vit_forward_flops(backbone, views) + projector_flops)


def utilisation(flops: StepFlops, seconds: float, student_rate: float, teacher_rate: float | None = None) -> float:
    """How close a step came to the machine's limit: the time the step's FLOPs would take at the given rates
    (FLOP/s; the teacher's may differ when it runs in another precision) over the measured time."""
    teacher_rate = student_rate if teacher_rate is None else teacher_rate
    return (flops.student / student_rate + flops.teacher / teacher_rate) / seconds


# --- the machine's limit ------------------------------------------------------------------------------------------


def measure_gemm_rate(
    device: str,
    dtype: torch.dtype,
    size: int,
    min_seconds: float = 1.0,
    max_calls: int = 50,
    timer: str = "wall",
    allow_tf32: bool = False,
) -> dict[str, float]:
    """FLOP/s of a `size x size x size` matrix product in `dtype` on `device`: the median and best of repeated
    calls (at least 3, until `min_seconds` of the timer have passed). float32 is measured without TF32 on CUDA
    unless `allow_tf32`.

    On a CPU the rate is that of the current torch thread count; `timer="cpu"` counts this process's CPU time, as
    the step benchmark does, so a shared machine's other jobs do not lower it.
    """
    clock = time.process_time if timer == "cpu" else time.perf_counter
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    flops = 2.0 * size**3
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        torch.matmul(a, b)  # warm-up: kernel selection, first-touch of the output
        synchronize(device)
        times: list[float] = []
        spent = 0.0
        while len(times) < 3 or (spent < min_seconds and len(times) < max_calls):
            start = clock()
            torch.matmul(a, b)
            synchronize(device)
            times.append(clock() - start)
            spent += times[-1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    # a CPU timer can read 0 for a tiny product; such calls carry no information
    times = [t for t in times if t > 0] or [float("nan")]
    return {
        "size": size,
        "calls": len(times),
        "median_flops_per_second": flops / statistics.median(times),
        "best_flops_per_second": flops / min(times),
    }


def make_gemm_step(device: str, dtype: torch.dtype, size: int) -> tuple[Callable, float]:
    """A callable that runs one `size`-cubed matrix product (float32 without TF32 on CUDA), for timing beside the
    training steps in `time_interleaved` (it ignores its arguments), and the FLOPs of one call."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)

    def step(*_):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return torch.matmul(a, b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return step, 2.0 * size**3


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- data ---------------------------------------------------------------------------------------------------------


def make_jpegs(count: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> list[bytes]:
    """`count` JPEGs of `size` (width, height): smooth random colour fields, which compress like photographs
    (white noise would not)."""
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        low = generator.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
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

    def process(jpegs: Sequence[bytes]) -> dict:
        pixel_values = torch.stack([transform(Image.open(io.BytesIO(data))) for data in jpegs])
        masks = torch.stack([torch.tensor(mask().flatten()) for _ in jpegs])
        return {"pixel_values": pixel_values, "bool_masked_pos": masks}

    return process


def mimco_pipeline(config: MimCoConfig) -> Callable:
    """The data path of `run_pretraining.py` in one process: example transform, then the collator."""
    from modeling_mimco.data.pipeline import pretraining_collator, pretraining_example_transform

    return _loader_process(pretraining_example_transform("image", config), pretraining_collator(config))


def _loader_process(example_transform: Callable, collator: Callable) -> Callable:
    """A loader's work on a list of JPEGs in one process: the example transform on the batch, then the collator."""

    def process(jpegs: Sequence[bytes]) -> dict:
        examples = example_transform({"image": [{"bytes": data, "path": None} for data in jpegs]})
        rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
        return collator(rows)

    return process


def torchvision_contrastive_transforms(image_size: int, image_mean, image_std) -> tuple[Callable, Callable]:
    """MoCo v3's two views with torchvision's v2 transforms, as a user of torchvision writes them (and as this
    package made them before `contrastive_views`): the reference of the stage-1 loader benchmark."""
    from torchvision.transforms import v2

    kernel = max(3, int(0.1 * image_size))
    kernel += 1 - kernel % 2  # odd, about 10 % of the side (23 at 224)

    def view(blur_p: float, solarize_p: float) -> v2.Compose:
        blur = v2.GaussianBlur(kernel, sigma=(0.1, 2.0))
        steps = [
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            blur if blur_p >= 1.0 else v2.RandomApply([blur], p=blur_p),
        ]
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        steps += [v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        return v2.Compose(steps + [v2.Normalize(list(image_mean), list(image_std))])

    return view(1.0, 0.0), view(0.1, 0.2)


def contrastive_pipeline(config: MimCoConfig, views: str = "ours") -> Callable:
    """The data path of stage 1 in one process: decode, two views, the collator. `views`: `"ours"` (the
    package's views, made whole in the loader), `"ours_photometric_on_device"` (the loader's share under
    `--augment_on_device`: decode, crop, parameters) or `"torchvision"` (`torchvision_contrastive_transforms`)."""
    from modeling_mimco.data.pipeline import ContrastiveCollator, ContrastiveExampleTransform
    from modeling_mimco.data.transforms import build_contrastive_transforms

    if views == "torchvision":
        transforms = torchvision_contrastive_transforms(config.image_size, config.image_mean, config.image_std)
    else:
        on_device = views == "ours_photometric_on_device"
        transforms = build_contrastive_transforms(
            config.image_size, config.image_mean, config.image_std, photometric_on_device=on_device, normalize=False
        )
    example_transform = ContrastiveExampleTransform(*transforms, "image")
    if views == "torchvision":
        example_transform.fast_jpeg = False  # PIL images, as MoCo v3's own loader hands them to the transforms
    # as `mimco-contrastive` builds it: 8-bit batches, normalised by the training step on its device
    return _loader_process(example_transform, ContrastiveCollator(config.image_size))


__all__ = [
    "contrastive_pipeline",
    "cpu_supports_bf16",
    "ReferenceMimCo",
    "StepFlops",
    "autocast",
    "contrastive_step_flops",
    "floor_step_flops",
    "make_contrastive_step",
    "make_floor_step",
    "make_gemm_step",
    "make_jpegs",
    "make_mimco_step",
    "make_reference_step",
    "measure_gemm_rate",
    "mimco_pipeline",
    "mimco_step_flops",
    "peak_memory_mb",
    "run_mim_pipeline",
    "same_loss_check",
    "synchronize",
    "time_interleaved",
    "torchvision_contrastive_transforms",
    "use_low_precision_teacher",
    "utilisation",
    "vit_forward_flops",
]
