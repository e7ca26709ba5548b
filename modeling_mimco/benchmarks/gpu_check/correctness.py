"""The GPU check's `correctness` part: fp32 forward and gradients on the device against the CPU for the four model
classes, bf16 autocast against fp32, the fused-AdamW NaN/Inf skip of the training loop, `torch.compile` against
eager, SDPA restricted to its fused kernels, and an exact `save_pretrained` -> `from_pretrained` round trip. Imports
torch, the model files and the package's `benchmarking` and `optimization`.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable

import torch

from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, Checks, exact_fp32, relative_difference
from modeling_mimco.benchmarks.measurement import autocast, synchronize
from modeling_mimco.configuration_mimco import MimCoConfig, MimCoContrastiveConfig
from modeling_mimco.masking import MimCoMaskGenerator
from modeling_mimco.modeling_mimco import MimCoForImageClassification, MimCoForPreTraining, MimCoModel
from modeling_mimco.modeling_mimco_contrastive import MimCoForContrastivePreTraining
from modeling_mimco.training.optimization import build_adamw, skip_update_if


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


def _to_float64(module, args, kwargs):
    """A forward pre-hook that runs a float64 copy of a model on the float32 inputs of the cases."""

    def cast(value):
        return value.double() if torch.is_tensor(value) and value.is_floating_point() else value

    return tuple(cast(value) for value in args), {key: cast(value) for key, value in kwargs.items()}


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
    """fp32 on the device against the CPU for the four model classes, bf16 autocast against fp32, the NaN skip,
    `torch.compile`, SDPA's fused kernels and the save/load round trip, each as one check."""
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


__all__ = ["check_correctness"]
