"""The MimCo reconstruction losses: the student's predictions against the frozen teacher's features.

Every function takes plain tensors, so each can be checked on its own against a slow reference.
`compute_patch_loss` and `compute_image_loss` are where a config's loss type picks its function. Only torch is
imported: the file is loaded as Hub remote code next to the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_across_processes(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenates `tensor` (first dimension = local batch) from every process of the default process group.

    Returns the gathered tensor and the offset of this process's rows in it. The result carries no gradient: it is
    meant for negatives and targets (the teacher's features), never for the queries that are trained. Processes may
    hold different batch sizes (a last, smaller batch); rows are padded for the collective and trimmed afterwards.
    Without an initialised process group this is the identity with offset 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.detach(), 0
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    local_size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    sizes = [int(size.item()) for size in sizes]
    max_size = max(sizes)

    padded = tensor.detach().contiguous()
    if padded.shape[0] < max_size:
        padding = padded.new_zeros((max_size - padded.shape[0], *padded.shape[1:]))
        padded = torch.cat([padded, padding])
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    gathered = torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)])
    return gathered, sum(sizes[:rank])


def gather_tokens(tokens: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
    """`tokens` `(batch, num_tokens, dim)` at `positions` `(batch, k)`: `(batch, k, dim)`, a static-shape gather."""
    return torch.gather(tokens, 1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patch_infonce_loss(
    patch_predictions: torch.Tensor,
    teacher_patch_tokens: torch.Tensor,
    bool_masked_pos: torch.BoolTensor,
    temperature: float,
    negatives: str = "image",
) -> torch.Tensor:
    """InfoNCE between the student's predictions for the masked patches and the teacher's patch tokens.

    Args:
        patch_predictions: `(num_masked, dim)`, the patch head's output for each masked patch, in the row-major
            order of `bool_masked_pos.nonzero()`.
        teacher_patch_tokens: `(batch_size, num_patches, dim)`, the teacher's patch tokens of the unmasked images.
        bool_masked_pos: `(batch_size, num_patches)`, `True` where the student's patch was masked.
        temperature: Softmax temperature.
        negatives: `"image"`: a prediction is contrasted with every teacher patch token of its own image (the token
            at its own position is the positive). `"batch"`: with every teacher patch token of the local batch.

    Both sides are L2-normalised. Returns the mean loss over the masked patches.
    """
    batch_size, num_patches, dim = teacher_patch_tokens.shape
    predictions = F.normalize(patch_predictions, dim=-1)
    targets = F.normalize(teacher_patch_tokens, dim=-1)
    image_index, position_index = bool_masked_pos.nonzero(as_tuple=True)

    if negatives == "image":
        # Scatter the predictions back onto the patch grid and compare each image with itself in one bmm; the rows
        # of unmasked positions are computed but never selected.
        scattered = predictions.new_zeros(batch_size, num_patches, dim)
        scattered[image_index, position_index] = predictions
        logits = torch.bmm(scattered, targets.transpose(1, 2))[image_index, position_index]
        labels = position_index
    elif negatives == "batch":
        logits = predictions @ targets.reshape(batch_size * num_patches, dim).T
        labels = image_index * num_patches + position_index
    else:
        raise ValueError(f"`negatives` must be 'image' or 'batch', got {negatives!r}.")
    return F.cross_entropy(logits.float() / temperature, labels)


def dense_patch_infonce_loss(
    patch_predictions: torch.Tensor,
    teacher_patch_tokens: torch.Tensor,
    masked_positions: torch.LongTensor,
    temperature: float,
    negatives: str = "image",
) -> torch.Tensor:
    """`patch_infonce_loss` for masks that hide the same number of patches in every image, with static shapes.

    Args:
        patch_predictions: `(batch_size, num_masked, dim)`, the patch head's output for each image's masked patches.
        teacher_patch_tokens: `(batch_size, num_patches, dim)`, the teacher's patch tokens of the unmasked images.
        masked_positions: `(batch_size, num_masked)`, the patch index of each prediction, ascending per image.
        temperature, negatives: as in `patch_infonce_loss`, which gives the same loss on the same mask.
    """
    batch_size, num_patches, dim = teacher_patch_tokens.shape
    predictions = F.normalize(patch_predictions, dim=-1)
    targets = F.normalize(teacher_patch_tokens, dim=-1)
    if negatives == "image":
        logits = torch.bmm(predictions, targets.transpose(1, 2))  # (batch, num_masked, num_patches)
        labels = masked_positions
    elif negatives == "batch":
        logits = predictions.flatten(0, 1) @ targets.reshape(batch_size * num_patches, dim).T
        offsets = torch.arange(batch_size, device=masked_positions.device).unsqueeze(1) * num_patches
        labels = masked_positions + offsets
    else:
        raise ValueError(f"`negatives` must be 'image' or 'batch', got {negatives!r}.")
    return F.cross_entropy(logits.flatten(0, -2).float() / temperature, labels.flatten())


def image_infonce_loss(
    image_predictions: torch.Tensor,
    teacher_image_features: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """InfoNCE between the student's global predictions and the teacher's global features.

    Args:
        image_predictions: `(batch_size, dim)`, the image head's output for each local image.
        teacher_image_features: `(batch_size, dim)`, the teacher's CLS token of the same images.
        temperature: Softmax temperature.

    The positive of image `i` is the teacher feature of image `i`; the negatives are the teacher features of every
    other image in the global batch, gathered from all processes, so N processes with batch B compute the same loss
    (and, averaged by DDP, the same gradient) as one process with batch N*B.
    """
    predictions = F.normalize(image_predictions, dim=-1)
    targets = F.normalize(teacher_image_features, dim=-1)
    all_targets, offset = gather_across_processes(targets)
    logits = predictions @ all_targets.T
    labels = torch.arange(predictions.shape[0], device=predictions.device) + offset
    return F.cross_entropy(logits.float() / temperature, labels)


def contrastive_infonce_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's InfoNCE: query `i` against the keys of the global batch, the positive being key `i`.

    Args:
        queries: `(batch_size, dim)`, the predictor's output for one view (trained).
        keys: `(batch_size, dim)`, the momentum branch's output for the other view (no gradient).
        temperature: Softmax temperature; the loss is multiplied by `2 * temperature` as in MoCo v3.
    """
    queries = F.normalize(queries, dim=-1)
    keys = F.normalize(keys, dim=-1)
    all_keys, offset = gather_across_processes(keys)
    logits = queries @ all_keys.T
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits.float() / temperature, labels) * (2 * temperature)


def cosine_distance_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean `1 - cosine similarity` of matching rows."""
    return (1.0 - F.cosine_similarity(predictions, targets, dim=-1)).mean()


def standardised_smooth_l1_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Smooth L1 against the targets standardised per token (LayerNorm without affine), as feature-regression MIM
    methods do, so the scale of the teacher's features does not set the scale of the loss."""
    targets = F.layer_norm(targets, targets.shape[-1:])
    return F.smooth_l1_loss(predictions, targets)


# The non-contrastive loss types, by the name a config gives them.
FEATURE_REGRESSION_LOSSES = {"cosine": cosine_distance_loss, "smooth_l1": standardised_smooth_l1_loss}


def feature_regression_loss(predictions: torch.Tensor, targets: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Non-contrastive alternatives to InfoNCE, row by row, computed in float32: `"cosine"`
    (`cosine_distance_loss`) or `"smooth_l1"` (`standardised_smooth_l1_loss`)."""
    if loss_type not in FEATURE_REGRESSION_LOSSES:
        choices = " or ".join(map(repr, FEATURE_REGRESSION_LOSSES))
        raise ValueError(f"`loss_type` must be {choices} here, got {loss_type!r}.")
    return FEATURE_REGRESSION_LOSSES[loss_type](predictions.float(), targets.float())


def compute_patch_loss(
    patch_predictions: torch.Tensor,
    teacher_patch_tokens: torch.Tensor,
    bool_masked_pos: torch.BoolTensor,
    loss_type: str,
    temperature: float,
    negatives: str = "image",
    masked_positions: torch.LongTensor | None = None,
) -> torch.Tensor:
    """The patch loss that `loss_type` (a config's `patch_loss_type`) names: `patch_infonce_loss` for `"infonce"`,
    else `feature_regression_loss` against the teacher's tokens at the masked positions. Arguments as in
    `patch_infonce_loss`; `temperature` and `negatives` only matter to InfoNCE.

    With `masked_positions` `(batch_size, num_masked)` (every image masks as many patches), `patch_predictions` is
    `(batch_size, num_masked, dim)` and the loss is computed with static shapes (`dense_patch_infonce_loss`, or the
    regression against the gathered teacher tokens): the same numbers as the general path on the same mask."""
    if masked_positions is not None:
        if loss_type == "infonce":
            return dense_patch_infonce_loss(
                patch_predictions, teacher_patch_tokens, masked_positions, temperature=temperature, negatives=negatives
            )
        targets = gather_tokens(teacher_patch_tokens, masked_positions)
        return feature_regression_loss(patch_predictions.flatten(0, 1), targets.flatten(0, 1), loss_type)
    if loss_type == "infonce":
        return patch_infonce_loss(
            patch_predictions, teacher_patch_tokens, bool_masked_pos, temperature=temperature, negatives=negatives
        )
    return feature_regression_loss(patch_predictions, teacher_patch_tokens[bool_masked_pos], loss_type)


def compute_image_loss(
    image_predictions: torch.Tensor, teacher_image_features: torch.Tensor, loss_type: str, temperature: float
) -> torch.Tensor:
    """The image loss that `loss_type` (a config's `image_loss_type`) names: `image_infonce_loss` for `"infonce"`,
    else `feature_regression_loss`. Arguments as in `image_infonce_loss`; `temperature` only matters to InfoNCE."""
    if loss_type == "infonce":
        return image_infonce_loss(image_predictions, teacher_image_features, temperature=temperature)
    return feature_regression_loss(image_predictions, teacher_image_features, loss_type)


__all__ = [
    "compute_image_loss",
    "compute_patch_loss",
    "contrastive_infonce_loss",
    "dense_patch_infonce_loss",
    "feature_regression_loss",
    "gather_across_processes",
    "gather_tokens",
    "image_infonce_loss",
    "patch_infonce_loss",
]
