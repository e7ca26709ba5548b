"""The GPU check's `data` part: the real stage-2 loader (the training loop's seeded batches in a DataLoader with
one worker per core) on generated 500x375 JPEGs, against the stage-2 step's images/s that the throughput part left
in the run's context; stage 1's loader, whole and with `--augment_on_device`, against the stage-1 step; and GPU JPEG decoding (`torchvision.io.decode_jpeg(..., device="cuda")`), an opt-in path
that the training scripts do not use. Imports torch, torchvision, datasets, the config and mask generator of the
model files and the package's `benchmarking`, `data` and `training`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch

from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, Checks
from modeling_mimco.benchmarks.measurement import make_jpegs, synchronize
from modeling_mimco.configuration_mimco import MODEL_PRESETS, MimCoConfig


def check_data(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """The loader in one process and with all workers, set against the stage-2 step; then decoding on the device."""
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

    def loader_check(key: str, num_workers: int, share: float) -> Callable[[], dict]:
        def measure() -> dict:
            measured = loader_rate(seeded, batch_size, num_workers, share * budget.remaining())
            result[key] = measured
            return {"passed": measured["images"] > 0, **measured}

        return measure

    def device_decoding() -> dict:
        measured = device_decode_rate(jpegs, batch_size, args.device, 0.8 * budget.remaining(), config)
        result["device_jpeg_decoding"] = measured
        return {"passed": measured["decode_images_per_second"] > 0, **measured}

    def stage1_check(photometric_on_device: bool) -> Callable[[], dict]:
        key = "stage1_photometric_on_device" if photometric_on_device else "stage1_all_workers"

        def measure() -> dict:
            dataset = stage1_loader_dataset(config, jpegs, args.seed, photometric_on_device)
            measured = loader_rate(dataset, batch_size, workers, 0.2 * budget.remaining(), key="pixel_values_1")
            if photometric_on_device:
                measured |= device_photometric_rate(dataset, batch_size, args.device, config)
            result[key] = measured
            return {"passed": measured["images"] > 0, **measured}

        return measure

    checks.run("loader_one_process", loader_check("one_process", 0, 0.12), budget)
    checks.run("loader_all_workers", loader_check("all_workers", workers, 0.3), budget)
    result["versus_step"] = loader_versus_step(result, context.get("stage2_images_per_second"))
    checks.run("stage1_loader_all_workers", stage1_check(False), budget)
    checks.run("stage1_loader_photometric_on_device", stage1_check(True), budget)
    result["stage1_versus_step"] = stage1_versus_step(result, context.get("stage1_images_per_second"))
    checks.run("decode_jpeg_on_device", device_decoding, budget)
    result["checks"] = checks.items
    return result


def loader_versus_step(result: dict, step_rate: float | None) -> dict:
    """The loader's images/s against the stage-2 step's: whether the GPU would wait, and the cores it would need."""
    if not (step_rate and "one_process" in result and "all_workers" in result):
        return {"reason": "skipped: no stage-2 step rate from the throughput part"}
    per_core = result["one_process"]["images_per_second"]
    loader = result["all_workers"]["images_per_second"]
    return {
        "stage2_step_images_per_second": step_rate,
        "loader_images_per_second": loader,
        "loader_over_step": loader / step_rate,
        "gpu_starved": loader < step_rate,
        # one worker per core scales about linearly, until memory bandwidth or the main process limits it
        "cores_needed_at_one_process_rate": math.ceil(step_rate / per_core),
    }


def stage1_versus_step(result: dict, step_rate: float | None) -> dict:
    """Stage 1's loader, whole on the CPU and with `--augment_on_device`, against the stage-1 step's images/s."""
    if not (step_rate and "stage1_all_workers" in result and "stage1_photometric_on_device" in result):
        return {"reason": "skipped: no stage-1 step rate from the throughput part"}
    cpu = result["stage1_all_workers"]["images_per_second"]
    deferred = result["stage1_photometric_on_device"]
    # with --augment_on_device the step also runs the photometric half: its time adds to the step's
    device_seconds = 1.0 / deferred["device_photometric_images_per_second"]
    step_with_photometric = 1.0 / (1.0 / step_rate + device_seconds)
    return {
        "stage1_step_images_per_second": step_rate,
        "loader_cpu_images_per_second": cpu,
        "loader_cpu_keeps_up": cpu >= step_rate,
        "loader_augment_on_device_images_per_second": deferred["images_per_second"],
        "step_with_device_photometric_images_per_second": step_with_photometric,
        "augment_on_device_keeps_up": deferred["images_per_second"] >= step_with_photometric,
    }


def stage1_loader_dataset(config: MimCoConfig, jpegs: list[bytes], seed: int, photometric_on_device: bool):
    """The stage-1 dataset as `run_contrastive_pretraining.py` builds it (its two views, whole or with the
    photometric half left to the device), in the training loop's seeded batches."""
    from modeling_mimco.data.pipeline import ContrastiveCollator, ContrastiveExampleTransform, apply_example_transform
    from modeling_mimco.data.transforms import build_contrastive_transforms
    from modeling_mimco.training.loop import SeededBatches

    dataset = _jpeg_dataset(jpegs)
    views = build_contrastive_transforms(
        config.image_size,
        config.image_mean,
        config.image_std,
        photometric_on_device=photometric_on_device,
        normalize=False,
    )
    dataset = apply_example_transform(dataset, ContrastiveExampleTransform(*views, "image"))
    return SeededBatches(dataset, ContrastiveCollator(config.image_size), seed)


def device_photometric_rate(dataset, batch_size: int, device: str, config: MimCoConfig) -> dict:
    """images/s of `apply_photometric` on `device` for both views of a batch (what `--augment_on_device` adds to
    the training step)."""
    from modeling_mimco.data.contrastive_views import apply_photometric

    batch = dataset.__getitems__(list(range(min(batch_size, len(dataset)))))[0]
    crops = [batch[f"pixel_values_{view}"].to(device) for view in ("1", "2")]
    parameters = [{k: v.to(device) for k, v in batch[f"photometric_{view}"].items()} for view in ("1", "2")]

    def both_views() -> None:
        for crop, params in zip(crops, parameters):
            apply_photometric(crop, params, config.image_mean, config.image_std)

    both_views()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or (time.perf_counter() - start < 2.0 and calls < 200):
        both_views()
        calls += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"device_photometric_images_per_second": calls * crops[0].shape[0] / seconds}


def device_decode_rate(jpegs: list[bytes], batch_size: int, device: str, seconds: float, config) -> dict:
    """Batched `torchvision.io.decode_jpeg` on `device` (nvJPEG on CUDA), alone and followed by the stage-2 crop,
    flip and normalisation on the device: the opt-in path of decoding on the GPU (the training scripts decode on
    the CPU, in the loader workers)."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from modeling_mimco.data.decoding import check_image_pixels, jpeg_frame_size

    for index, data in enumerate(jpegs):  # the size limit of every decoder, from the frame header, as decode_image
        check_image_pixels(*(jpeg_frame_size(data) or (0, 0)), f"(benchmark JPEG {index})")
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


def stage2_loader_dataset(config: MimCoConfig, jpegs: list[bytes], seed: int):
    """The stage-2 dataset as `run_pretraining.py` and the training loop build it, over undecoded JPEG records:
    `data.build_pretraining_pipeline`, with the collator run per batch by the loop's seeded-batch wrapper."""
    from modeling_mimco.data.pipeline import build_pretraining_pipeline
    from modeling_mimco.training.loop import SeededBatches

    dataset, collator = build_pretraining_pipeline(_jpeg_dataset(jpegs), "image", config)
    return SeededBatches(dataset, collator, seed)


def _jpeg_dataset(jpegs: list[bytes]):
    """The JPEGs as undecoded `{"bytes", "path"}` records in an `"image"` column, as a loaded dataset holds them."""
    import datasets

    return datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in jpegs]},
        features=datasets.Features({"image": datasets.Image(decode=False)}),
    )


def loader_rate(seeded, batch_size: int, workers: int, seconds: float, key: str = "pixel_values") -> dict:
    """images/s of a DataLoader built like the training loop's, in steady state: the first `workers` batches
    (worker start-up, each worker's first batch) are not timed; then batches are read for `seconds`.

    The images are drawn with replacement from the (small) dataset, so that the run never ends for want of rows;
    which images a batch holds does not change what decoding and augmenting it costs.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from modeling_mimco.training.loop import only_batch

    sampler = RandomSampler(seeded, replacement=True, num_samples=10**8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        seeded,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=only_batch,
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
            images += int(next(iterator)[key].shape[0])
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    finally:
        del iterator  # shuts the workers down
    return {"workers": workers, "images": images, "seconds": elapsed, "images_per_second": images / elapsed}


__all__ = ["check_data"]
