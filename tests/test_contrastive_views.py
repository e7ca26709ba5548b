"""Stage 1's views (`modeling_mimco.data.contrastive_views`): each op against an exact reference we did not write
(torchvision's colour functions, SciPy's Gaussian filter), the parameter distributions of MoCo v3's recipe, and the
loader's path against the batched path that `--augment_on_device` runs (same seeds, same parameters, same images)."""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image
import pytest
import scipy.ndimage
import torch
from torchvision.transforms.v2 import functional as TF

from modeling_mimco.benchmarks.measurement import make_jpegs
from modeling_mimco.data import contrastive_views as views
from modeling_mimco.data.decoding import decode_image
from modeling_mimco.data.pipeline import ContrastiveCollator, ContrastiveExampleTransform
from modeling_mimco.data.transforms import build_contrastive_transforms


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Eight 96-px images in [0, 1]: smooth colour fields of real JPEGs (photograph-like statistics)."""
    images = [TF.pil_to_tensor(PIL.Image.open(io.BytesIO(data)).convert("RGB")) for data in make_jpegs(8, (96, 96))]
    return torch.stack(images).float() / 255


@pytest.mark.parametrize("factor", [-0.1, -0.03, 0.02, 0.1])
def test_hue_equals_torchvisions_hsv_shift(photos, factor):
    expected = torch.stack([TF.adjust_hue(image, factor) for image in photos])
    torch.testing.assert_close(views.adjust_hue(photos, torch.full((8,), factor)), expected, atol=1e-5, rtol=0)
    # the loader's NumPy kernel for one image: the same numbers
    for image, reference in zip(photos, expected):
        ours = torch.from_numpy(views.adjust_hue_one(image.numpy(), factor))
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_hue_keeps_gray_pixels_and_handles_ties():
    gray = torch.full((1, 3, 4, 4), 0.5)
    torch.testing.assert_close(views.adjust_hue(gray, torch.tensor([0.1])), gray)
    ties = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 3)
    expected = TF.adjust_hue(ties[0], 0.05)[None]
    torch.testing.assert_close(views.adjust_hue(ties, torch.tensor([0.05])), expected, atol=1e-6, rtol=0)
    # the loader's one-image kernel: the same on gray pixels and ties
    np.testing.assert_array_equal(views.adjust_hue_one(gray[0].numpy(), 0.1), gray[0].numpy())
    np.testing.assert_allclose(views.adjust_hue_one(ties[0].numpy(), 0.05), expected[0].numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (views.adjust_brightness, TF.adjust_brightness),
        (views.adjust_contrast, TF.adjust_contrast),
        (views.adjust_saturation, TF.adjust_saturation),
    ],
    ids=["brightness", "contrast", "saturation"],
)
def test_brightness_contrast_saturation_equal_torchvisions_float_functions(photos, ours, theirs):
    factors = torch.linspace(0.6, 1.4, 8)
    expected = torch.stack([theirs(image, float(factor)) for image, factor in zip(photos, factors)])
    torch.testing.assert_close(ours(photos, factors), expected, atol=1e-6, rtol=0)


def _only(op: str, factor: float = 1.0) -> views.ViewParameters:
    """Parameters that apply one photometric op (the other jitter factors are the identity)."""
    factors = [1.0, 1.0, 1.0, 0.0]
    if op in ("brightness", "contrast", "saturation", "hue"):
        factors[("brightness", "contrast", "saturation", "hue").index(op)] = factor
    return views.ViewParameters(
        crop_box=(0, 0, 1, 1),
        flip=False,
        jitter=op in ("brightness", "contrast", "saturation", "hue"),
        jitter_factors=tuple(factors),
        jitter_order=(0, 1, 2, 3),
        grayscale=op == "grayscale",
        blur_sigma=0.0,
        solarize=op == "solarize",
    )


@pytest.mark.parametrize(
    "op, factor, theirs",
    [
        ("brightness", 1.35, TF.adjust_brightness),
        ("brightness", 0.7, TF.adjust_brightness),
        ("contrast", 1.3, TF.adjust_contrast),
        ("contrast", 0.65, TF.adjust_contrast),
        ("saturation", 1.2, TF.adjust_saturation),
        ("saturation", 0.8, TF.adjust_saturation),
        ("hue", 0.08, TF.adjust_hue),
        ("hue", -0.1, TF.adjust_hue),
        ("grayscale", None, lambda image, _: TF.rgb_to_grayscale(image, num_output_channels=3)),
        ("solarize", None, lambda image, _: TF.solarize(image, SOLARIZE_THRESHOLD_FLOAT)),
    ],
)
def test_the_loaders_one_image_ops_equal_torchvisions(photos, op, factor, theirs):
    """The loader's path (`photometric_one`: NumPy, on the 8-bit scale) one op at a time, against torchvision's
    function of the same op on the float image in [0, 1]."""
    for photo in photos:
        crop = (photo * 255).round().to(torch.uint8)
        ours = torch.from_numpy(views.photometric_one(crop, _only(op, factor))) / 255
        torch.testing.assert_close(ours, theirs(crop.float() / 255, factor), atol=2e-6, rtol=0)


SOLARIZE_THRESHOLD_FLOAT = 128 / 255


def _blur_each_image_alone(photos: torch.Tensor, sigma: float) -> torch.Tensor:
    """The loader's one-image blur (`gaussian_blur_one`, NumPy in and out), image by image."""
    return torch.stack([torch.from_numpy(views.gaussian_blur_one(image.numpy(), sigma)) for image in photos])


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.3, 2.0])
@pytest.mark.parametrize("path", ["batch", "one_image"])
def test_blur_is_an_exact_gaussian_up_to_its_truncation(photos, sigma, path):
    """Both blurs (the batched one of `--augment_on_device`, the loader's one-image one) against SciPy's Gaussian
    filter with the same reflected border ('mirror' in SciPy's terms) and a kernel reaching 6 sigma: ours stops at
    ceil(3 sigma), which leaves out at most 0.3 % of the weight, so no pixel may differ by more than 0.3 % of the
    range."""
    if path == "batch":
        ours = views.gaussian_blur(photos, torch.full((8,), sigma))
    else:
        ours = _blur_each_image_alone(photos, sigma)
        torch.testing.assert_close(ours, views.gaussian_blur(photos, torch.full((8,), sigma)), atol=1e-6, rtol=0)
    reference = scipy.ndimage.gaussian_filter(photos.double().numpy(), (0, 0, sigma, sigma), mode="mirror", truncate=6)
    difference = (ours.double() - torch.from_numpy(reference)).abs().max()
    assert difference < 3e-3, float(difference)


def test_blur_uses_each_images_own_sigma(photos):
    sigmas = torch.tensor([0.3, 1.7])
    together = views.gaussian_blur(photos[:2], sigmas)
    for index in range(2):
        alone = views.gaussian_blur(photos[index : index + 1], sigmas[index : index + 1])
        torch.testing.assert_close(together[index : index + 1], alone, atol=1e-6, rtol=0)


def test_parameters_follow_moco_v3s_distributions():
    """10,000 draws of each view against the recipe: probabilities within 5 standard errors, ranges exact."""
    torch.manual_seed(0)
    view_1, view_2 = views.moco_v3_view_recipes(224)
    draws = {name: [views.draw_view_parameters(recipe, 375, 500) for _ in range(10_000)] for name, recipe in
             (("view_1", view_1), ("view_2", view_2))}  # fmt: skip

    def rate(name: str, what) -> float:
        return float(np.mean([bool(what(p)) for p in draws[name]]))

    def close(measured: float, p: float) -> bool:
        return abs(measured - p) <= 5 * math.sqrt(p * (1 - p) / 10_000) + 1e-9

    for name in draws:
        assert close(rate(name, lambda p: p.jitter), 0.8)
        assert close(rate(name, lambda p: p.grayscale), 0.2)
        assert close(rate(name, lambda p: p.flip), 0.5)
        factors = np.array([p.jitter_factors for p in draws[name]])
        assert (factors[:, 0] >= 0.6).all() and (factors[:, 0] <= 1.4).all()
        assert (factors[:, 2] >= 0.8).all() and (factors[:, 2] <= 1.2).all()
        assert (np.abs(factors[:, 3]) <= 0.1).all() and abs(factors[:, 3].mean()) < 0.003
        orders = {p.jitter_order for p in draws[name]}
        assert len(orders) == 24  # every order of the four ops occurs
        boxes = np.array([p.crop_box for p in draws[name]])
        area = boxes[:, 2] * boxes[:, 3] / (375 * 500)
        assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
        aspect = boxes[:, 3] / boxes[:, 2]
        assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
        # inside the image, at a uniform position: the top edge's share of the free rows averages one half
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 375).all()
        assert (boxes[:, 1] + boxes[:, 3] <= 500).all()
        free = (375 - boxes[:, 2]) > 20
        assert abs((boxes[free, 0] / (375 - boxes[free, 2])).mean() - 0.5) < 0.02
    assert close(rate("view_1", lambda p: p.blur_sigma > 0), 1.0) and close(
        rate("view_2", lambda p: p.blur_sigma > 0), 0.1
    )
    sigmas = np.array([p.blur_sigma for p in draws["view_1"]])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.02
    assert close(rate("view_1", lambda p: p.solarize), 0.0) and close(rate("view_2", lambda p: p.solarize), 0.2)


def _seeded_views(image, photometric_on_device: bool, seeds: list[int]):
    view_1, view_2 = build_contrastive_transforms(64, MEAN, STD, photometric_on_device=photometric_on_device)
    outputs = []
    for seed in seeds:
        torch.manual_seed(seed)  # as the training loop seeds each image
        outputs.append((view_1(image), view_2(image)))
    return outputs


def test_the_device_path_gives_the_loaders_parameters_and_images():
    """`--augment_on_device`: the same per-image seeds draw the same parameters, and the batched photometric half
    (the code that runs on the accelerator, here on CPU tensors) gives the loader's images to float rounding."""
    image = decode_image(make_jpegs(1, (160, 120))[0], fast_jpeg=True)
    seeds = list(range(40))
    loader = _seeded_views(image, False, seeds)
    deferred = _seeded_views(image, True, seeds)
    for view in (0, 1):
        crops = torch.stack([pair[view]["crop"] for pair in deferred])
        parameters = views.stack_parameters([pair[view] for pair in deferred])
        batched = views.apply_photometric(crops, parameters, MEAN, STD)
        expected = torch.stack([pair[view] for pair in loader])
        # both round to 8 bits: equal but for the rare value that float rounding puts on the other side of a
        # half level (one level, 1 / 255 / std in these units)
        difference = (batched - expected).abs()
        level = 1 / 255 / min(STD)
        assert difference.max() <= level + 1e-5
        assert (difference > 1e-5).float().mean() < 1e-3
    # and the parameters were really varied: jitter, grayscale, blur and solarize all occurred in the 40 images
    second = views.stack_parameters([pair[1] for pair in deferred])
    assert second["jitter"].any() and second["grayscale"].any() and (second["blur_sigma"] > 0).any()
    assert second["solarize"].any() and not second["solarize"].all()


def test_collator_stacks_crops_and_parameters_for_the_device():
    image = make_jpegs(1, (80, 60))[0]
    transforms = build_contrastive_transforms(32, MEAN, STD, photometric_on_device=True)
    transform = ContrastiveExampleTransform(*transforms, "image")
    output = transform({"image": [{"bytes": image, "path": None}] * 3 + [b"broken"]})
    rows = [dict(zip(output, values)) for values in zip(*output.values())]
    batch = ContrastiveCollator(32)(rows)
    assert batch["pixel_values_1"].dtype == torch.uint8 and batch["pixel_values_1"].shape == (3, 3, 32, 32)
    assert set(batch["photometric_2"]) == set(views.PHOTOMETRIC_KEYS)
    assert batch["photometric_2"]["jitter_order"].shape == (3, 4) and int(batch["num_skipped"]) == 1
    finished = views.apply_photometric(batch["pixel_values_1"], batch["photometric_1"], MEAN, STD)
    assert finished.dtype == torch.float32 and finished.shape == (3, 3, 32, 32)


def test_the_crop_is_torchvisions_resized_crop():
    image = decode_image(make_jpegs(1, (500, 375))[0], fast_jpeg=True)
    for box in [(0, 0, 375, 500), (10, 20, 100, 130), (40, 60, 300, 280), (3, 7, 20, 30)]:
        parameters = views.ViewParameters(box, False, False, (1.0, 1.0, 1.0, 0.0), (0, 1, 2, 3), False, 0.0, False)
        expected = TF.resized_crop(image, *box, [64, 64], TF.InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(views.crop_view(image, parameters, 64), expected)


def test_a_view_from_a_pil_image_equals_the_view_from_its_tensor():
    image = PIL.Image.open(io.BytesIO(make_jpegs(1, (90, 70))[0])).convert("RGB")
    view_1, _ = build_contrastive_transforms(32, MEAN, STD)
    torch.manual_seed(3)
    from_pil = view_1(image)
    torch.manual_seed(3)
    from_tensor = view_1(TF.pil_to_tensor(image))
    torch.testing.assert_close(from_pil, from_tensor)


@pytest.mark.slow
def test_stage1_command_with_augment_on_device_trains_like_the_loader_path(tmp_path):
    """`scripts/run_contrastive_pretraining.py --augment_on_device` (photometric half in the training step): the
    same seeds give the same views, so its losses are those of the default run to float rounding."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    common = ["--model_preset", "tiny", "--projector_hidden_size", "64", "--projection_size", "16"]
    common += ["--per_device_train_batch_size", "16", "--max_train_steps", "3", "--logging_steps", "1"]
    common += ["--report_to", "none", "--dataloader_num_workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    histories = []
    for name, extra in (("loader", []), ("device", ["--augment_on_device"])):
        output_dir = tmp_path / name
        command = [sys.executable, str(repo / "scripts" / "run_contrastive_pretraining.py"), *common, *extra]
        completed = subprocess.run(
            [*command, "--output_dir", str(output_dir)], env=env, capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        histories.append(json.loads((output_dir / "train_results.json").read_text())["log_history"])
    loader, device = histories
    assert [record["step"] for record in loader] == [record["step"] for record in device] == [1, 2, 3]
    # measured: 7e-7 at step 1 (before any update), up to 1.3e-5 after Adam's first updates
    assert device[0]["loss"] == pytest.approx(loader[0]["loss"], abs=1e-5)
    for record_loader, record_device in zip(loader[1:], device[1:]):
        assert record_device["loss"] == pytest.approx(record_loader["loss"], abs=1e-4)
