"""Stage 1 of MimCo: the MoCo v3 contrastive ViT (`MimCoForContrastivePreTraining`) that becomes the stage-2
teacher, with its projector and predictor MLPs and their cross-process BatchNorm.

Its base and momentum encoders are `MimCoModel`s (`modeling_mimco.py`). Like the other model files it imports only
them, torch and transformers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_mimco import MimCoContrastiveConfig
from .losses import contrastive_infonce_loss
from .modeling_mimco import MimCoModel, MimCoPreTrainedModel, derive_seeds


class MimCoBatchNorm1d(nn.BatchNorm1d):
    """`BatchNorm1d` whose training statistics cover the global batch of all processes.

    `nn.SyncBatchNorm` only runs on accelerators; this one also synchronises gloo processes on CPUs. The statistics
    are reduced with an autograd-aware all-reduce, so N processes with batch B give the same outputs and gradients
    as one process with batch N*B. The same formula is used on a single process, so both agree to rounding.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            import torch.distributed.nn.functional as dist_functional

            all_reduce = dist_functional.all_reduce
        else:

            def all_reduce(tensor):
                return tensor

        # Statistics in at least float32 and in two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels badly
        # in low precision or when the mean is large against the spread.
        values = input.to(torch.promote_types(input.dtype, torch.float32))
        count = values.new_full((1,), values.shape[0])
        sums = all_reduce(torch.cat([values.sum(dim=0), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        variance = all_reduce(((values - mean) ** 2).sum(dim=0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = variance * total / (total - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        output = (values - mean) * torch.rsqrt(variance + self.eps)
        if self.affine:
            output = output * self.weight + self.bias
        return output.to(input.dtype)


def build_mlp(
    num_layers: int, input_size: int, hidden_size: int, output_size: int, last_batch_norm: bool = True
) -> nn.Sequential:
    """MoCo v3's MLP: `Linear -> BN -> ReLU` blocks, a last `Linear`, then a BatchNorm without affine parameters."""
    layers = []
    for index in range(num_layers):
        in_features = input_size if index == 0 else hidden_size
        out_features = output_size if index == num_layers - 1 else hidden_size
        layers.append(nn.Linear(in_features, out_features, bias=False))
        if index < num_layers - 1:
            layers.extend([MimCoBatchNorm1d(out_features), nn.ReLU(inplace=True)])
        elif last_batch_norm:
            layers.append(MimCoBatchNorm1d(out_features, affine=False))
    return nn.Sequential(*layers)


@dataclass
class MimCoContrastiveOutput(ModelOutput):
    r"""
    Output of `MimCoForContrastivePreTraining`.

    Args:
        loss (`torch.FloatTensor` of shape `()`): The symmetrised InfoNCE loss of the two views.
        queries (`tuple(torch.FloatTensor)`): The predictor's output for view 1 and view 2,
            each `(batch_size, projection_size)`.
        momentum_keys (`tuple(torch.FloatTensor)`): The momentum branch's output (MoCo's keys) for view 1 and
            view 2, each `(batch_size, projection_size)`. Not named `keys`, which would hide `ModelOutput.keys()`.
    """

    loss: torch.FloatTensor | None = None
    queries: tuple[torch.FloatTensor, torch.FloatTensor] | None = None
    momentum_keys: tuple[torch.FloatTensor, torch.FloatTensor] | None = None


class MimCoForContrastivePreTraining(MimCoPreTrainedModel):
    """Stage 1: a MoCo v3 contrastive ViT that becomes the MimCo teacher.

    The base encoder (a `MimCoModel`) and its projector and predictor are trained on the queries; a momentum copy of
    encoder and projector, updated by EMA, provides the keys. The keys of both views are gathered from every process,
    so negatives span the global batch. `export_teacher` writes the momentum (or base) encoder as a plain
    `MimCoModel` checkpoint for stage 2.
    """

    config_class = MimCoContrastiveConfig
    config: MimCoContrastiveConfig
    base_model_prefix = "base_encoder"
    main_input_name = "pixel_values_1"
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: MimCoContrastiveConfig):
        super().__init__(config)
        backbone_config = config.backbone_config
        hidden_size = backbone_config.hidden_size
        self.base_encoder = MimCoModel(backbone_config)
        self.base_projector = build_mlp(3, hidden_size, config.projector_hidden_size, config.projection_size)
        self.predictor = build_mlp(2, config.projection_size, config.projector_hidden_size, config.projection_size)
        self.momentum_encoder = MimCoModel(backbone_config)
        self.momentum_projector = build_mlp(3, hidden_size, config.projector_hidden_size, config.projection_size)
        self.post_init()
        self.reset_momentum_branch()

    def freeze_untrained_parameters(self) -> None:
        """Freezes the momentum branch, the unused mask token, fixed positions and, if configured, the patch
        projection. Called at construction and after `from_pretrained` (which makes every loaded weight trainable)."""
        self.base_encoder.freeze_untrained_parameters()
        # stage 1 never masks, and a parameter without gradient would stall DDP's reducer
        self.base_encoder.embeddings.mask_token.requires_grad_(False)
        if self.config.freeze_patch_embeddings:
            self.base_encoder.embeddings.patch_embeddings.requires_grad_(False)
        self.momentum_encoder.requires_grad_(False)
        self.momentum_projector.requires_grad_(False)

    def _remote_auto_map(self) -> dict[str, str]:
        # a stage-1 folder is a stage-1 model: its own config class, loaded by `AutoModelForPreTraining`
        return {
            "AutoConfig": "configuration_mimco.MimCoContrastiveConfig",
            "AutoModelForPreTraining": "modeling_mimco_contrastive.MimCoForContrastivePreTraining",
        }

    def _after_loading(self, missing_keys: set[str]) -> None:
        if any(name.startswith(("momentum_encoder.", "momentum_projector.")) for name in missing_keys):
            # a backbone checkpoint: MoCo starts with the momentum branch equal to the base branch, not random
            self.reset_momentum_branch()
        super()._after_loading(missing_keys)

    def reset_momentum_branch(self) -> None:
        """Copies the base encoder and projector into the momentum branch (frozen)."""
        with torch.no_grad():
            for base, momentum in self._momentum_pairs():
                momentum.copy_(base)
        self.freeze_untrained_parameters()

    def _momentum_pairs(self):
        base = list(self.base_encoder.parameters()) + list(self.base_projector.parameters())
        momentum = list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters())
        return zip(base, momentum)

    @torch.no_grad()
    def update_momentum_branch(self, momentum: float) -> None:
        """EMA step: `momentum_param = momentum * momentum_param + (1 - momentum) * base_param`.

        Under FSDP the momentum branch is whole on every process while a base weight may be a DTensor shard (a
        block's, resharded after its forward): such a weight is all-gathered first, so that every process applies
        the same update to its whole copy. The all-gathers are collectives, taken in the same order everywhere.
        """
        weight = 1.0 - momentum
        whole, sharded = [], []
        for base, momentum_param in self._momentum_pairs():
            (sharded if hasattr(base, "full_tensor") else whole).append((momentum_param, base))
        if whole:
            torch._foreach_lerp_([m for m, _ in whole], [b for _, b in whole], weight)
        for momentum_param, base in sharded:
            momentum_param.lerp_(base.full_tensor(), weight)

    def momentum_at(self, progress: float) -> float:
        """The cosine momentum schedule: `momentum` at `progress` 0, rising to `momentum_final` at 1."""
        progress = min(max(progress, 0.0), 1.0)
        start, end = self.config.momentum, self.config.momentum_final
        return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _query(self, pixel_values: torch.Tensor, sample_seeds: torch.Tensor | None) -> torch.Tensor:
        features = self.base_encoder(pixel_values, sample_seeds=sample_seeds).pooler_output
        return self.predictor(self.base_projector(features))

    @torch.no_grad()
    def _key(self, pixel_values: torch.Tensor, sample_seeds: torch.Tensor | None) -> torch.Tensor:
        features = self.momentum_encoder(pixel_values, sample_seeds=sample_seeds).pooler_output
        return self.momentum_projector(features)

    @can_return_tuple
    def forward(
        self,
        pixel_values_1: torch.Tensor | None = None,
        pixel_values_2: torch.Tensor | None = None,
        momentum: float | None = None,
        sample_seeds: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MimCoContrastiveOutput:
        r"""
        Every argument is named here: any other keyword is a `TypeError` (`return_dict` excepted).
        `output_hidden_states` / `output_attentions` are taken because transformers' generic callers pass them to
        every model; the MoCo output has no per-layer states, so they change nothing (the encoders' own are
        `model.base_encoder(pixel_values, output_hidden_states=True)`).

        Args:
            pixel_values_1, pixel_values_2 (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`):
                Two augmented views of the same images.
            momentum (`float`, *optional*): When given (in training), the momentum branch takes one EMA step
                towards the base branch before computing the keys, as in MoCo v3.
            sample_seeds (`torch.LongTensor` of shape `(batch_size,)`, *optional*): per-image seeds of stochastic
                depth and dropout (see `MimCoModel.forward`); each of the four encoder passes derives its own.
        """
        if pixel_values_1 is None or pixel_values_2 is None:
            raise ValueError("You have to specify both `pixel_values_1` and `pixel_values_2`.")
        seeds = [None] * 4 if sample_seeds is None else [derive_seeds(sample_seeds, stream) for stream in range(4)]
        query_1, query_2 = self._query(pixel_values_1, seeds[0]), self._query(pixel_values_2, seeds[1])
        if momentum is not None:
            self.update_momentum_branch(momentum)
        key_1, key_2 = self._key(pixel_values_1, seeds[2]), self._key(pixel_values_2, seeds[3])
        temperature = self.config.temperature
        loss = contrastive_infonce_loss(query_1, key_2, temperature) + contrastive_infonce_loss(
            query_2, key_1, temperature
        )
        return MimCoContrastiveOutput(loss=loss, queries=(query_1, query_2), momentum_keys=(key_1, key_2))

    def export_teacher(self, save_directory: str, encoder: str = "momentum", **kwargs) -> MimCoModel:
        """Saves the momentum (default) or base encoder as a plain `MimCoModel` checkpoint, the stage-2 teacher."""
        if encoder not in ("momentum", "base"):
            raise ValueError(f"`encoder` must be 'momentum' or 'base', got {encoder!r}.")
        source = self.momentum_encoder if encoder == "momentum" else self.base_encoder
        teacher = MimCoModel(copy.deepcopy(self.config.backbone_config))
        teacher.load_state_dict(source.state_dict())
        teacher.save_pretrained(save_directory, **kwargs)
        return teacher


# Marked for remote code where the class is defined, so that every `save_pretrained` writes the `auto_map` and copies
# the model files, however the class was imported (the package's Auto-class registration is separate, and lazy).
MimCoForContrastivePreTraining.register_for_auto_class("AutoModelForPreTraining")


__all__ = [
    "MimCoBatchNorm1d",
    "MimCoContrastiveOutput",
    "MimCoForContrastivePreTraining",
    "build_mlp",
]
