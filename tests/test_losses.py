"""The MimCo losses against slow loop references, the masked-only patch loss of `MimCoForPreTraining`, and the
cross-process image loss on two real gloo processes."""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_mimco import MimCoForPreTraining
from modeling_mimco.losses import (
    feature_regression_loss,
    gather_across_processes,
    image_infonce_loss,
    patch_infonce_loss,
)


TEMPERATURE = 0.2


# ----------------------------------------------------------------------------------------------------------------
# loop references


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def _cross_entropy(logits: list[torch.Tensor], positive: int) -> torch.Tensor:
    logits = torch.stack(logits)
    return torch.logsumexp(logits, dim=0) - logits[positive]


def reference_patch_infonce(predictions, teacher_tokens, bool_masked_pos, temperature, negatives):
    """One cross-entropy per masked (b, i), written out: row `r` of `predictions` belongs to the r-th masked patch
    in row-major order."""
    batch_size, num_patches, _ = teacher_tokens.shape
    losses = []
    row = 0
    for b in range(batch_size):
        for i in range(num_patches):
            if not bool_masked_pos[b, i]:
                continue
            query = _unit(predictions[row])
            row += 1
            if negatives == "image":
                keys = [(b, j) for j in range(num_patches)]
            else:
                keys = [(c, j) for c in range(batch_size) for j in range(num_patches)]
            logits = [torch.dot(query, _unit(teacher_tokens[c, j])) / temperature for c, j in keys]
            losses.append(_cross_entropy(logits, keys.index((b, i))))
    assert row == predictions.shape[0]
    return sum(losses) / len(losses)


def reference_image_infonce(predictions, teacher_features, temperature):
    losses = []
    for i in range(predictions.shape[0]):
        query = _unit(predictions[i])
        logits = [torch.dot(query, _unit(teacher_features[j])) / temperature for j in range(teacher_features.shape[0])]
        losses.append(_cross_entropy(logits, i))
    return sum(losses) / len(losses)


def reference_cosine(predictions, targets):
    total = 0.0
    for p, t in zip(predictions, targets):
        total = total + 1.0 - torch.dot(p, t) / (p.norm() * t.norm())
    return total / predictions.shape[0]


def reference_smooth_l1(predictions, targets, eps=1e-5):
    total = 0.0
    count = 0
    for p, t in zip(predictions, targets):
        mean = sum(t) / len(t)
        variance = sum((v - mean) ** 2 for v in t) / len(t)
        for pv, tv in zip(p, t):
            difference = abs(pv - (tv - mean) / math.sqrt(variance + eps))
            total = total + (0.5 * difference**2 if difference < 1.0 else difference - 0.5)
            count += 1
    return total / count


def _uneven_mask(batch_size: int, num_patches: int, counts: list[int], generator: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    for b, count in enumerate(counts):
        mask[b, torch.randperm(num_patches, generator=generator)[:count]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# patch loss


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_patch_infonce_matches_loop_reference(negatives):
    generator = torch.Generator().manual_seed(0)
    batch_size, num_patches, dim = 3, 16, 8
    # an uneven number of masked patches per image, one image with none (it still gives "batch" negatives)
    mask = _uneven_mask(batch_size, num_patches, [5, 0, 11], generator)
    teacher = torch.randn(batch_size, num_patches, dim, generator=generator)
    predictions = torch.randn(int(mask.sum()), dim, generator=generator, requires_grad=True)

    loss = patch_infonce_loss(predictions, teacher, mask, TEMPERATURE, negatives=negatives)
    (gradient,) = torch.autograd.grad(loss, predictions)

    predictions64 = predictions.detach().double().requires_grad_(True)
    expected = reference_patch_infonce(predictions64, teacher.double(), mask, TEMPERATURE, negatives)
    (expected_gradient,) = torch.autograd.grad(expected, predictions64)

    assert loss.shape == ()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, atol=1e-5, rtol=1e-5)


def test_patch_negatives_image_and_batch_differ():
    """Batch negatives include the other images' tokens: the two losses must not coincide."""
    generator = torch.Generator().manual_seed(1)
    mask = _uneven_mask(2, 16, [6, 9], generator)
    teacher = torch.randn(2, 16, 8, generator=generator)
    predictions = torch.randn(int(mask.sum()), 8, generator=generator)
    image = patch_infonce_loss(predictions, teacher, mask, TEMPERATURE, negatives="image")
    batch = patch_infonce_loss(predictions, teacher, mask, TEMPERATURE, negatives="batch")
    assert batch > image  # strictly more negatives, each with a positive exponential


def test_patch_infonce_image_negatives_stay_inside_the_image():
    """With "image" negatives, another image's teacher tokens cannot change the loss; with "batch" they do."""
    generator = torch.Generator().manual_seed(2)
    mask = _uneven_mask(2, 16, [16, 0], generator)
    teacher = torch.randn(2, 16, 8, generator=generator)
    predictions = torch.randn(int(mask.sum()), 8, generator=generator)
    changed = teacher.clone()
    changed[1] = torch.randn(16, 8, generator=generator)
    for negatives, should_change in (("image", False), ("batch", True)):
        before = patch_infonce_loss(predictions, teacher, mask, TEMPERATURE, negatives=negatives)
        after = patch_infonce_loss(predictions, changed, mask, TEMPERATURE, negatives=negatives)
        assert torch.allclose(before, after) is not should_change, negatives


def test_patch_infonce_rejects_unknown_negatives():
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="negatives"):
        patch_infonce_loss(torch.randn(4, 8), torch.randn(1, 4, 8), mask, TEMPERATURE, negatives="queue")


def test_pretraining_patch_loss_uses_masked_tokens_only(tiny_mimco_config):
    """The patch head runs on the masked tokens only: one prediction row per masked patch, a patch loss equal to the
    reference computed from those rows, and no gradient at all reaching the student's visible tokens or CLS."""
    torch.manual_seed(0)
    model = MimCoForPreTraining(tiny_mimco_config(image_loss_weight=0.0)).eval()
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    mask = _uneven_mask(2, 64, [20, 37], generator)

    output = model(pixel_values, bool_masked_pos=mask)
    assert output.image_loss is None and output.image_predictions is None
    assert output.patch_predictions.shape == (int(mask.sum()), model.config.get_teacher_config().hidden_size)

    _, teacher_patch_tokens = model.teacher_features(pixel_values)
    expected = reference_patch_infonce(
        output.patch_predictions.detach().double(), teacher_patch_tokens.double(), mask, TEMPERATURE, "image"
    )
    torch.testing.assert_close(output.patch_loss.double(), expected, atol=1e-5, rtol=1e-5)

    output.last_hidden_state.retain_grad()
    output.loss.backward()
    token_gradients = output.last_hidden_state.grad
    assert torch.count_nonzero(token_gradients[:, 0]) == 0  # CLS: only the (disabled) image head reads it
    patch_gradients = token_gradients[:, 1:]
    assert torch.count_nonzero(patch_gradients[~mask]) == 0
    assert (patch_gradients[mask].abs().sum(dim=-1) > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# image loss and feature regression


def test_image_infonce_matches_loop_reference():
    generator = torch.Generator().manual_seed(4)
    predictions = torch.randn(5, 12, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 12, generator=generator)
    loss = image_infonce_loss(predictions, teacher, TEMPERATURE)
    (gradient,) = torch.autograd.grad(loss, predictions)

    predictions64 = predictions.detach().double().requires_grad_(True)
    expected = reference_image_infonce(predictions64, teacher.double(), TEMPERATURE)
    (expected_gradient,) = torch.autograd.grad(expected, predictions64)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, atol=1e-5, rtol=1e-5)


def test_image_infonce_gives_no_gradient_to_the_targets():
    predictions = torch.randn(4, 6, requires_grad=True)
    targets = torch.randn(4, 6, requires_grad=True)
    image_infonce_loss(predictions, targets, TEMPERATURE).backward()
    assert predictions.grad is not None
    assert targets.grad is None


@pytest.mark.parametrize("loss_type", ["cosine", "smooth_l1"])
def test_feature_regression_matches_loop_reference(loss_type):
    generator = torch.Generator().manual_seed(5)
    predictions = torch.randn(7, 10, generator=generator) * 1.5
    targets = torch.randn(7, 10, generator=generator) * 3.0 + 2.0  # scale and offset that smooth_l1 removes
    loss = feature_regression_loss(predictions, targets, loss_type)
    reference = reference_cosine if loss_type == "cosine" else reference_smooth_l1
    expected = reference(predictions.double(), targets.double())
    torch.testing.assert_close(loss.double(), torch.as_tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_feature_regression_rejects_infonce():
    with pytest.raises(ValueError, match="loss_type"):
        feature_regression_loss(torch.randn(2, 3), torch.randn(2, 3), "infonce")


def test_gather_is_identity_without_a_process_group():
    assert not dist.is_initialized()
    tensor = torch.randn(3, 4, requires_grad=True)
    gathered, offset = gather_across_processes(tensor)
    assert offset == 0
    assert torch.equal(gathered, tensor)
    assert not gathered.requires_grad  # as on several processes: the gathered rows are never trained


# ----------------------------------------------------------------------------------------------------------------
# two real processes


DISTRIBUTED_CASES = {"equal": (3, 3), "unequal": (3, 2)}


def _fixed_batch(num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + num_rows)
    return torch.randn(num_rows, 8, generator=generator), torch.randn(num_rows, 8, generator=generator)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name, sizes in DISTRIBUTED_CASES.items():
            predictions, targets = _fixed_batch(sum(sizes))
            start = sum(sizes[:rank])
            stop = start + sizes[rank]
            local_predictions = predictions[start:stop].clone().requires_grad_(True)
            loss = image_infonce_loss(local_predictions, targets[start:stop], TEMPERATURE)
            loss.backward()
            gathered, offset = gather_across_processes(targets[start:stop])
            torch.save(
                {"loss": loss.detach(), "grad": local_predictions.grad, "gathered": gathered, "offset": offset},
                f"{out_dir}/{name}_{rank}.pt",
            )
    finally:
        dist.destroy_process_group()
    # Results are on disk: skip the interpreter's teardown of torch and transformers, which takes seconds.
    os._exit(0)


@pytest.mark.slow
def test_image_infonce_across_two_processes_equals_one_process(tmp_path):
    world_size = 2
    mp.spawn(
        _distributed_worker,
        args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )

    for name, sizes in DISTRIBUTED_CASES.items():
        total = sum(sizes)
        predictions, targets = _fixed_batch(total)
        predictions = predictions.clone().requires_grad_(True)
        full_loss = image_infonce_loss(predictions, targets, TEMPERATURE)
        full_loss.backward()
        results = [torch.load(tmp_path / f"{name}_{rank}.pt", weights_only=True) for rank in range(world_size)]

        for rank, result in enumerate(results):
            start = sum(sizes[:rank])
            assert result["offset"] == start, name
            torch.testing.assert_close(result["gathered"], targets, atol=0, rtol=0)

        # Each process's loss is the mean over its own rows: weighted by row count, they give the full loss.
        weighted = sum(result["loss"] * size for result, size in zip(results, sizes)) / total
        torch.testing.assert_close(weighted, full_loss.detach(), atol=1e-6, rtol=1e-6)
        if len(set(sizes)) == 1:
            # DDP's reduction: the plain average of the per-process losses and gradients.
            torch.testing.assert_close(sum(r["loss"] for r in results) / world_size, full_loss.detach())
            ddp_gradient = torch.cat([r["grad"] for r in results]) / world_size
            torch.testing.assert_close(ddp_gradient, predictions.grad, atol=1e-6, rtol=1e-5)
        else:
            # Unequal local batches: each process's gradient is that of its own mean, so it carries weight n_r / N.
            weighted_gradient = torch.cat([r["grad"] * size / total for r, size in zip(results, sizes)])
            torch.testing.assert_close(weighted_gradient, predictions.grad, atol=1e-6, rtol=1e-5)
