"""PyTorch MimCo models: a ViT backbone, the masked-image student with its frozen contrastive teacher, the image
classifier, and `MimCoBackbone`, the feature maps for dense decoders (`AutoBackbone`). The stage-1 contrastive model
that trains the teacher is in `modeling_mimco_contrastive.py`.

The backbone's weights map one-to-one onto timm's `VisionTransformer` (see `vit_checkpoints.py`):
`embeddings.cls_token` is `cls_token`, `layers.{i}.attention.qkv` is `blocks.{i}.attn.qkv`, and so on. This file
is loaded as Hub remote code: it imports only the other model files, torch and transformers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_mimco import MimCoConfig, MimCoRemoteTeacherConfig, check_feature_pyramid
from .losses import compute_image_loss, compute_patch_loss, gather_tokens
from .masking import MimCoMaskGenerator
from .teacher import TeacherInputAdapter


logger = logging.get_logger(__name__)


def get_2d_sincos_position_embeddings(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings of shape `(1, 1 + grid_size**2, hidden_size)`.

    The first half of the channels encodes the row, the second half the column, each as sines and cosines of geometrically spaced
    frequencies; the CLS position is all zeros (the MoCo v3 / MAE construction).
    """
    if hidden_size % 4 != 0:
        raise ValueError(f"2-D sin-cos position embeddings need `hidden_size` divisible by 4, got {hidden_size}.")
    quarter = hidden_size // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_rows, grid_cols = torch.meshgrid(coords, coords, indexing="ij")
    out_cols = grid_cols.flatten()[:, None] * omega[None]
    out_rows = grid_rows.flatten()[:, None] * omega[None]
    # rows first, as in MoCo v3's table, so a freshly built sin-cos model equals a MoCo v3 checkpoint's
    patch_embeddings = torch.cat([out_rows.sin(), out_rows.cos(), out_cols.sin(), out_cols.cos()], dim=1)
    cls_embedding = torch.zeros(1, hidden_size, dtype=torch.float64)
    return torch.cat([cls_embedding, patch_embeddings]).unsqueeze(0).float()


def resample_position_embeddings(position_embeddings: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Resamples `(1, 1 + g*g, D)` position embeddings to a `grid_height` x `grid_width` patch grid.

    The CLS position is kept; the patch positions are resized bicubically with antialiasing, in float32, as timm's
    `resample_abs_pos_embed` does. Embeddings already on that grid are returned as they are. Used at run time by
    `MimCoEmbeddings.interpolate_pos_encoding` and, to convert checkpoints to another resolution, by `convert.py`.
    """
    class_position, patch_positions = position_embeddings[:, :1], position_embeddings[:, 1:]
    old_grid = math.isqrt(patch_positions.shape[1])
    if old_grid * old_grid != patch_positions.shape[1]:
        raise ValueError(f"Position embeddings of shape {tuple(position_embeddings.shape)} are not 1 + a square grid.")
    if grid_height == old_grid and grid_width == old_grid:
        return position_embeddings
    dim = patch_positions.shape[-1]
    patch_positions = patch_positions.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    patch_positions = nn.functional.interpolate(
        patch_positions, size=(grid_height, grid_width), mode="bicubic", align_corners=False, antialias=True
    )
    patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
    return torch.cat([class_position, patch_positions.to(class_position.dtype)], dim=1)


# --- per-image randomness ---------------------------------------------------------------------------------------
#
# In training, stochastic depth and dropout draw random numbers. Drawn from torch's global generator, they depend on
# how a batch is split across processes and micro-batches, so N processes with batch B would not train like one with
# batch N*B. Given `sample_seeds` (one int per image, from the data pipeline's per-image seed), they are drawn instead
# from a counter-based hash of (image seed, site, element): the same numbers for an image wherever it lands. Each
# place that draws has its own `site` number, so that no two places share numbers.

_LOW_32_BITS = 0xFFFFFFFF
SEED_SITES_PER_LAYER = 8  # sites of layer i: 8 * (i + 1) + k, k < 8; site 0 is the embeddings' dropout


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of values in [0, 2**32): an int64 tensor or a Python int.

    The multipliers are below 2**31, so no int64 product overflows: the same bits on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW_32_BITS
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _LOW_32_BITS
    return x ^ (x >> 16)


def seeded_uniform(sample_seeds: torch.Tensor, site: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Uniform numbers in [0, 1) of shape `(batch_size, *shape)` that depend only on each image's seed and `site`.

    Args:
        sample_seeds (`torch.LongTensor` of shape `(batch_size,)`): one seed per image.
        site (`int`): which draw of the forward pass this is (a layer's drop path, a dropout, ...).
        shape: the per-image shape (empty for one number per image, as stochastic depth needs).
    """
    x = _mix32((sample_seeds.to(torch.int64) & _LOW_32_BITS) ^ _mix32(site * 0x9E3779B1 & _LOW_32_BITS))
    if shape:
        counter = torch.arange(math.prod(shape), device=sample_seeds.device, dtype=torch.int64).view(shape)
        x = _mix32(x.view(-1, *(1,) * len(shape)) ^ _mix32(counter))
    # the top 24 bits, exactly representable in float32
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def derive_seeds(sample_seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """Other per-image seeds for another pass over the same images (stage 1's second view, its momentum encoder)."""
    return _mix32((sample_seeds.to(torch.int64) & _LOW_32_BITS) ^ _mix32((stream + 0x632BE5AB) & _LOW_32_BITS))


def drop_path(
    hidden_states: torch.Tensor,
    drop_prob: float,
    training: bool,
    sample_seeds: torch.Tensor | None = None,
    site: int = 0,
) -> torch.Tensor:
    """Stochastic depth: zeroes the residual branch of whole samples with probability `drop_prob`.

    With `sample_seeds` `(batch_size,)`, whether an image's branch is kept comes from its seed and `site`
    (`seeded_uniform`); without, from torch's global generator.
    """
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    if sample_seeds is None:
        keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    else:
        keep = (seeded_uniform(sample_seeds, site) < keep_prob).to(hidden_states.dtype).view(shape)
    return hidden_states * keep / keep_prob


def dropout(
    hidden_states: torch.Tensor,
    drop_prob: float,
    training: bool,
    sample_seeds: torch.Tensor | None = None,
    site: int = 0,
) -> torch.Tensor:
    """Element-wise dropout, drawn from `sample_seeds` (per image, per element) when given."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    if sample_seeds is None:
        return nn.functional.dropout(hidden_states, p=drop_prob, training=True)
    keep_prob = 1.0 - drop_prob
    keep = seeded_uniform(sample_seeds, site, tuple(hidden_states.shape[1:])) < keep_prob
    return hidden_states * keep.to(hidden_states.dtype) / keep_prob


def drop_path_rates(config: MimCoConfig) -> list[float]:
    """Stochastic depth rate of each block, rising linearly from 0 in the first to `drop_path_rate` in the last.

    Plain floats, not `torch.linspace`: a model built on the meta device (`from_pretrained`, `init_empty_weights`)
    could not read a tensor's values.
    """
    num_layers = config.num_hidden_layers
    if num_layers == 1:
        return [0.0]
    return [config.drop_path_rate * index / (num_layers - 1) for index in range(num_layers)]


class MimCoDropPath(nn.Module):
    """Stochastic depth of one residual branch; `site` names its draw when per-image seeds are given."""

    def __init__(self, drop_prob: float = 0.0, site: int = 0):
        super().__init__()
        self.drop_prob = drop_prob
        self.site = site

    def forward(self, hidden_states: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training, sample_seeds, self.site)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class MimCoDropout(nn.Module):
    """`nn.Dropout` that draws from per-image seeds when given (`dropout`); `site` names its draw."""

    def __init__(self, drop_prob: float = 0.0, site: int = 0):
        super().__init__()
        self.p = drop_prob
        self.site = site

    def forward(self, hidden_states: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        return dropout(hidden_states, self.p, self.training, sample_seeds, self.site)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MimCoPatchEmbeddings(nn.Module):
    """Cuts `pixel_values` `(batch, channels, height, width)` into patches and projects each to `hidden_size`,
    giving `(batch, num_patches, hidden_size)` in row-major grid order."""

    def __init__(self, config: MimCoConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class MimCoEmbeddings(nn.Module):
    """Patch embeddings, the mask token for masked positions, the CLS token and the position embeddings."""

    def __init__(self, config: MimCoConfig):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.patch_embeddings = MimCoPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.grid_size**2 + 1, config.hidden_size),
            requires_grad=config.position_embedding_type == "learned",
        )
        self.dropout = MimCoDropout(config.hidden_dropout_prob, site=0)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a `height` x `width` input, resampled bicubically from the trained grid."""
        return resample_position_embeddings(
            self.position_embeddings, height // self.patch_size, width // self.patch_size
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        sample_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch_size, num_channels, height, width = pixel_values.shape
        if num_channels != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` has {num_channels} channels but the model expects `num_channels` = "
                f"{self.config.num_channels}."
            )
        if interpolate_pos_encoding:
            if height % self.patch_size or width % self.patch_size:
                raise ValueError(
                    f"Input image size ({height}x{width}) must be divisible by `patch_size` ({self.patch_size})."
                )
        elif height != self.image_size or width != self.image_size:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model's `image_size` ({self.image_size}x"
                f"{self.image_size}); pass `interpolate_pos_encoding=True` to use another resolution."
            )

        embeddings = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        if bool_masked_pos is not None:
            if bool_masked_pos.shape != embeddings.shape[:2]:
                raise ValueError(
                    f"`bool_masked_pos` has shape {tuple(bool_masked_pos.shape)} but (batch_size, num_patches) = "
                    f"{tuple(embeddings.shape[:2])} was expected."
                )
            mask = bool_masked_pos.unsqueeze(-1)
            embeddings = torch.where(mask, self.mask_token.to(embeddings.dtype), embeddings)

        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        embeddings = torch.cat([cls_tokens, embeddings], dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings, sample_seeds)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. `query`/`key`/`value`: `(batch, heads, tokens, head_dim)`; returns the output as
    `(batch, tokens, heads, head_dim)` and the attention probabilities `(batch, heads, tokens, tokens)`."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MimCoAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection (timm's `Attention`)."""

    def __init__(self, config: MimCoConfig, site: int = 0):
        super().__init__()
        self.config = config
        self.site = site
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        sample_seeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask`: the mask that `create_bidirectional_mask` prepared for the configured kernel (None: every
        token attends to every token). `head_mask` `(num_heads,)`: a factor per head on its attention probabilities
        (0 switches a head off), as ViT's `head_mask` was; applied to each head's output, which is the same product
        and works with every attention kernel."""
        batch_size, num_tokens, hidden_size = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        if sample_seeds is not None and self.training and self.attention_dropout > 0:
            # a fused kernel draws its dropout from the global generator: per-image seeds need the plain product
            scores = torch.matmul(query, key.transpose(-1, -2)) * self.scaling
            if attention_mask is not None:
                scores = scores + attention_mask
            attn_weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            attn_weights = dropout(attn_weights, self.attention_dropout, True, sample_seeds, self.site)
            attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
        else:
            # Attention probabilities only exist in the eager kernel, so asking for them selects it for this call.
            attention_interface: Callable = eager_attention_forward
            if not output_attentions:
                attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                    self.config._attn_implementation, eager_attention_forward
                )
            attn_output, attn_weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
                is_causal=False,
            )
        if head_mask is not None:
            # (probabilities * m) @ values == m * (probabilities @ values): one factor per head on its output
            head_mask = head_mask.to(attn_output.dtype)
            attn_output = attn_output * head_mask.view(1, 1, self.num_heads, 1)
            if output_attentions and attn_weights is not None:
                attn_weights = attn_weights * head_mask.view(1, self.num_heads, 1, 1)
        attn_output = self.proj(attn_output.reshape(batch_size, num_tokens, hidden_size))
        return attn_output, (attn_weights if output_attentions else None)


class MimCoMLP(nn.Module):
    def __init__(self, config: MimCoConfig, site: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = MimCoDropout(config.hidden_dropout_prob, site)
        self.output_dropout = MimCoDropout(config.hidden_dropout_prob, site + 1)

    def forward(self, hidden_states: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)), sample_seeds)
        return self.output_dropout(self.fc2(hidden_states), sample_seeds)


class MimCoLayer(GradientCheckpointingLayer):
    """A pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with stochastic depth."""

    def __init__(self, config: MimCoConfig, drop_path_rate: float = 0.0, layer_index: int = 0):
        super().__init__()
        site = SEED_SITES_PER_LAYER * (layer_index + 1)  # sites site .. site + 5 (see `seeded_uniform`)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = MimCoAttention(config, site=site)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MimCoMLP(config, site=site + 1)
        self.dropout = MimCoDropout(config.hidden_dropout_prob, site=site + 3)
        # one per residual branch: two independent draws per image, as timm's blocks hold two drop paths
        self.drop_path = MimCoDropPath(drop_path_rate, site=site + 4)
        self.mlp_drop_path = MimCoDropPath(drop_path_rate, site=site + 5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        sample_seeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sample_seeds` `(batch_size,)`: per-image seeds of stochastic depth and dropout (None: global RNG);
        `attention_mask` and `head_mask` (this layer's row): see `MimCoAttention.forward`."""
        attention_output, attn_weights = self.attention(
            self.layernorm_before(hidden_states), output_attentions, sample_seeds, attention_mask, head_mask
        )
        hidden_states = hidden_states + self.drop_path(self.dropout(attention_output, sample_seeds), sample_seeds)
        mlp_output = self.mlp(self.layernorm_after(hidden_states), sample_seeds)
        hidden_states = hidden_states + self.mlp_drop_path(mlp_output, sample_seeds)
        return hidden_states, attn_weights


class MimCoPredictionHead(nn.Module):
    """Maps student tokens to the teacher's width: `Linear -> act -> Linear`, or one `Linear` when
    `hidden_size` is 0."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int, hidden_act: str = "gelu"):
        super().__init__()
        if hidden_size > 0:
            self.fc1 = nn.Linear(in_features, hidden_size)
            self.activation = ACT2FN[hidden_act]
            self.fc2 = nn.Linear(hidden_size, out_features)
        else:
            self.fc1 = None
            self.activation = None
            self.fc2 = nn.Linear(in_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fc1 is not None:
            hidden_states = self.activation(self.fc1(hidden_states))
        return self.fc2(hidden_states)


# The weights that only a `MimCoForPreTraining` checkpoint holds besides its student (`mimco.*`): the teacher and the
# two heads. Loading into a backbone or classifier, converting and publishing skip them.
PRETRAINING_ONLY_PREFIXES = ("teacher.", "patch_head.", "image_head.")


class MimCoPreTrainedModel(PreTrainedModel):
    config_class = MimCoConfig
    config: MimCoConfig
    base_model_prefix = "mimco"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MimCoEmbeddings", "MimCoLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # every MimCo forward traces as one graph (tests/test_vit_api.py compiles each with `fullgraph=True`)
    _can_compile_fullgraph = True
    # A pre-training checkpoint also holds the teacher and the heads; the backbone and classifier skip them quietly.
    _keys_to_ignore_on_load_unexpected = [f"^{re.escape(prefix)}" for prefix in PRETRAINING_ONLY_PREFIXES]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            if module.affine:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.track_running_stats:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, MimCoEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            init.trunc_normal_(module.mask_token, mean=0.0, std=std)
            if module.config.position_embedding_type == "sincos":
                sincos = get_2d_sincos_position_embeddings(module.config.hidden_size, module.grid_size)
                init.copy_(module.position_embeddings, sincos)
            else:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)

    def freeze_untrained_parameters(self) -> None:
        """Marks the parameters that are never trained (fixed sin-cos positions, a teacher) `requires_grad=False`.

        Called at construction and again after `from_pretrained`, which re-creates every loaded parameter as
        trainable.
        """
        for module in self.modules():
            if isinstance(module, MimCoEmbeddings):
                module.position_embeddings.requires_grad_(module.config.position_embedding_type == "learned")

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        # the loading info tells which weights the checkpoint lacked; it is returned only when asked for, as usual
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model._after_loading(set(loading_info["missing_keys"]))
        return (model, loading_info) if output_loading_info else model

    def _after_loading(self, missing_keys: set[str]) -> None:
        """Runs after `from_pretrained` with the names of the weights that the checkpoint did not have."""
        self.freeze_untrained_parameters()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, and the folder loads anywhere and serves the pipelines: the config's
        `auto_map` names every Auto class that the folder loads into as remote code (`_remote_auto_map`: a
        pre-training checkpoint into `AutoModelForImageClassification`, for instance), and the image processor of
        the model's inputs (`default_image_processor`) is written as `preprocessor_config.json`, unless the folder
        already holds one (the `Trainer`'s, a command's). With `push_to_hub=True` a processor written here is
        uploaded after the model, in a commit of its own."""
        import os

        if getattr(type(self), "_auto_class", None) is not None:
            self.config.auto_map = self._remote_auto_map()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if not is_main_process or not os.path.isdir(save_directory):
            return result
        if os.path.isfile(os.path.join(save_directory, "preprocessor_config.json")):
            return result
        processor = self.default_image_processor()
        if processor is None:
            logger.warning(f"{save_directory}: no image processor saved (transformers' processors do not import).")
            return result
        if kwargs.get("push_to_hub"):
            hub_kwargs = {key: kwargs[key] for key in ("repo_id", "token", "create_pr", "private") if key in kwargs}
            repo_id = hub_kwargs.pop("repo_id", os.fspath(save_directory).split(os.path.sep)[-1])
            processor.save_pretrained(os.fspath(save_directory), push_to_hub=True, repo_id=repo_id, **hub_kwargs)
        else:
            processor.save_pretrained(save_directory)
        return result

    def _remote_auto_map(self) -> dict[str, str]:
        """The `auto_map` saved with this model: each Auto class its folder loads into, and the class it gets."""
        return dict(MIMCO_AUTO_MAP)

    def _pixel_config(self) -> MimCoConfig:
        """The `MimCoConfig` that describes this model's input images (a composite config's backbone)."""
        return self.config if isinstance(self.config, MimCoConfig) else self.config.backbone_config

    def default_image_processor(self):
        """The image processor that turns images into this model's `pixel_values`, saved with it: transformers'
        `ViTImageProcessor` (its PIL variant where torchvision is missing), a bicubic resize to the config's
        `image_size`, then rescaling and the config's `image_mean` / `image_std`. `None` where neither imports."""
        from transformers.image_utils import PILImageResampling

        size, mean, std = pixel_normalisation(self._pixel_config())
        return stock_image_processor(
            ("ViTImageProcessor", "ViTImageProcessorPil"),
            size={"height": size, "width": size},
            resample=PILImageResampling.BICUBIC,
            image_mean=mean,
            image_std=std,
        )


def stock_image_processor(class_names: tuple[str, ...], **kwargs):
    """The first of transformers' image processor classes `class_names` that can be built here (torchvision or PIL
    may be missing), built with `kwargs`; `None` when none can."""
    import transformers

    for name in class_names:
        try:
            return getattr(transformers, name)(**kwargs)
        except (ImportError, AttributeError):
            continue
    return None


def pixel_normalisation(config: MimCoConfig) -> tuple[int, list[float], list[float]]:
    """`(image_size, image_mean, image_std)` of a config, the mean and std one value per channel (a config whose
    fields were set to a single number after it was built, as transformers' common tests do, included)."""

    def per_channel(value) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [float(item) for item in value]
        return [float(value)] * config.num_channels

    return int(config.image_size), per_channel(config.image_mean), per_channel(config.image_std)


def _select_hidden_states(
    hidden_states: tuple[torch.Tensor, ...] | None, selection: bool | int | list[int] | None
) -> tuple[torch.Tensor | None, ...] | None:
    """All `hidden_states` when `output_hidden_states` is a flag; when it is indices, those (negative ones counting
    from the end) and `None` in the place of the others."""
    if hidden_states is None or selection is None or isinstance(selection, bool):
        return hidden_states
    indices = [selection] if isinstance(selection, int) else list(selection)
    kept = {index % len(hidden_states) for index in indices if -len(hidden_states) <= index < len(hidden_states)}
    return tuple(state if index in kept else None for index, state in enumerate(hidden_states))


# the attention kernels that take `attention_mask` as the additive `(batch, 1, 1, tokens)` bias built below
_ADDITIVE_MASK_KERNELS = ("eager", "sdpa")


def prepare_attention_mask(
    attention_mask: torch.Tensor | None, embeddings: torch.Tensor, attn_implementation: str | None
) -> torch.Tensor | None:
    """ViT's `attention_mask` `(batch_size, 1 + num_patches)` (1 or `True`: a token others attend to; 0: one they
    ignore; CLS first) as the additive bias `(batch_size, 1, 1, tokens)` of the eager and SDPA kernels."""
    if attention_mask is None:
        return None
    batch_size, num_tokens = embeddings.shape[:2]
    if tuple(attention_mask.shape) != (batch_size, num_tokens):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but (batch_size, 1 + num_patches) = "
            f"{(batch_size, num_tokens)} was expected (the CLS token first, as ViT's)."
        )
    implementation = attn_implementation or "eager"
    if implementation not in _ADDITIVE_MASK_KERNELS:
        raise ValueError(
            f"`attention_mask` works with the {' and '.join(_ADDITIVE_MASK_KERNELS)} attention kernels; this model "
            f"runs {implementation!r}. Load it with attn_implementation='sdpa' to mask tokens."
        )
    dtype = embeddings.dtype
    ignored = 1.0 - attention_mask.to(device=embeddings.device, dtype=dtype)
    return (ignored * torch.finfo(dtype).min)[:, None, None, :]


def prepare_head_mask(head_mask: torch.Tensor | None, num_layers: int, num_heads: int) -> list[torch.Tensor | None]:
    """`head_mask` `(num_heads,)` (every layer) or `(num_layers, num_heads)`, as ViT's was, as one row per layer (or
    `None` for each without a mask): 1 keeps a head, 0 switches it off, other values scale it."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.shape == (num_heads,):
        return [head_mask] * num_layers
    if head_mask.shape == (num_layers, num_heads):
        return list(head_mask.unbind(0))
    raise ValueError(
        f"`head_mask` has shape {tuple(head_mask.shape)} but (num_heads,) = ({num_heads},) or (num_hidden_layers, "
        f"num_heads) = ({num_layers}, {num_heads}) was expected."
    )


class MimCoModel(MimCoPreTrainedModel):
    """The bare MimCo Vision Transformer, returning the normalised tokens `[CLS, patches]` and a pooled feature."""

    def __init__(self, config: MimCoConfig, add_pooling_layer: bool = True):
        r"""
        add_pooling_layer (`bool`, *optional*, defaults to `True`):
            Whether to compute `pooler_output` (as ViTModel's): without, it is `None`, and with `pooling="mean"` the
            pooling LayerNorm (`pooler_norm`) is not built, so that a checkpoint's `pooler_norm.*` weights are left
            unused.
        """
        super().__init__(config)
        self.config = config
        self.add_pooling_layer = add_pooling_layer
        self.embeddings = MimCoEmbeddings(config)
        self.layers = nn.ModuleList(
            [MimCoLayer(config, rate, index) for index, rate in enumerate(drop_path_rates(config))]
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.pooling == "mean" and add_pooling_layer
            else None
        )
        self.post_init()
        self.freeze_untrained_parameters()

    def get_input_embeddings(self) -> MimCoPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        sample_seeds: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling:
        r"""
        Every argument is named here: any other keyword is a `TypeError` (`return_dict`, which `can_return_tuple`
        reads, excepted), never silently ignored.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images (see `ViTImageProcessor`).
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
                `True` where a patch is replaced by the learned mask token before the encoder.
            interpolate_pos_encoding (`bool`, *optional*):
                Resample the position embeddings to the input's resolution.
            output_attentions / output_hidden_states (`bool`, *optional*):
                Also return each layer's attention probabilities / the embeddings and every layer's output.
                `output_hidden_states` may also be indices into those `num_hidden_layers + 1` hidden states (an `int`
                or a list, negative ones counting from the end, as in transformers): the others are then `None`.
            sample_seeds (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                One seed per image (the training commands pass the data pipeline's per-image seeds). In training,
                stochastic depth and dropout are then drawn from each image's seed, so that an image gets the same
                draws whichever process or micro-batch it lands in. Without it they come from torch's generator.
            attention_mask (`torch.Tensor` of shape `(batch_size, 1 + num_patches)`, *optional*):
                As ViT's: 1 for the tokens (CLS first) that the others attend to, 0 for those they ignore (mean
                pooling averages the kept patches). Eager and SDPA attention only (`prepare_attention_mask`).
            head_mask (`torch.Tensor` of shape `(num_heads,)` or `(num_hidden_layers, num_heads)`, *optional*):
                As ViT's was: each head's attention probabilities are multiplied by its entry (0 switches the head
                off), in every layer or per layer. Works with every attention kernel.

        Returns:
            `BaseModelOutputWithPooling`: `last_hidden_state` `(batch_size, 1 + num_patches, hidden_size)` after the
            final LayerNorm (CLS first); `pooler_output` `(batch_size, hidden_size)`, the CLS token or the normalised
            mean of the patch tokens (`None` when built with `add_pooling_layer=False`).
        """
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        hidden_states = self.embeddings(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
            sample_seeds=sample_seeds,
        )
        token_mask = attention_mask
        attention_mask = prepare_attention_mask(
            attention_mask, hidden_states, "eager" if output_attentions else self.config._attn_implementation
        )
        head_masks = prepare_head_mask(head_mask, len(self.layers), self.config.num_attention_heads)
        hidden_states, all_hidden_states, all_attentions = self._run_layers(
            hidden_states, output_attentions, output_hidden_states, sample_seeds, attention_mask, head_masks
        )

        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=self._pool(hidden_states, sequence_output, token_mask),
            hidden_states=_select_hidden_states(all_hidden_states, output_hidden_states),
            attentions=all_attentions,
        )

    def _run_layers(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool,
        output_hidden_states,
        sample_seeds: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        head_masks: list[torch.Tensor | None],
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """The encoder layers over the embeddings: the last layer's output, and the embeddings and every layer's
        output / attention probabilities when `output_hidden_states` / `output_attentions` ask for them."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer, layer_head_mask in zip(self.layers, head_masks):
            hidden_states, attn_weights = layer(
                hidden_states, output_attentions, sample_seeds, attention_mask, layer_head_mask
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions

    def _pool(
        self, hidden_states: torch.Tensor, sequence_output: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """`pooler_output`: `None` without the pooling layer; with `pooling="mean"`, the normalised mean of the patch
        tokens (those `token_mask` keeps); otherwise the final CLS token."""
        if not self.add_pooling_layer:
            return None
        if self.pooler_norm is None:
            return sequence_output[:, 0]
        patch_tokens = hidden_states[:, 1:]
        if token_mask is None:
            return self.pooler_norm(patch_tokens.mean(dim=1))
        # the mean of the patches that `attention_mask` keeps
        kept = token_mask[:, 1:, None].to(device=patch_tokens.device, dtype=patch_tokens.dtype)
        return self.pooler_norm((patch_tokens * kept).sum(1) / kept.sum(1).clamp(min=1))


@dataclass
class MimCoForPreTrainingOutput(ModelOutput):
    r"""
    Output of `MimCoForPreTraining`.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `patch_loss_weight * patch_loss + image_loss_weight * image_loss`.
        patch_loss (`torch.FloatTensor` of shape `()`, *optional*): Loss on the masked patches; `None` when its
            weight is 0.
        image_loss (`torch.FloatTensor` of shape `()`, *optional*): Loss on the global feature; `None` when its
            weight is 0.
        patch_predictions (`torch.FloatTensor` of shape `(num_masked, teacher_hidden_size)`, *optional*): The patch
            head's output for each masked patch, in the row-major order of `bool_masked_pos.nonzero()`.
        image_predictions (`torch.FloatTensor` of shape `(batch_size, teacher_hidden_size)`, *optional*): The image
            head's output for each image.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, hidden_size)`): The student's
            final tokens on the masked input.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): The student's embeddings and layer outputs.
        attentions (`tuple(torch.FloatTensor)`, *optional*): The student's attention probabilities.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`): The mask the student saw (`True`:
            masked), the one passed in or the one the mask generator drew. Row `i` of `patch_predictions` is the
            patch `bool_masked_pos.nonzero()[i]` (image index, patch index in row-major grid order).
        masked_positions (`torch.LongTensor` of shape `(batch_size, num_masked)`, *optional*): When every image
            masks as many patches (every mask the package draws), the masked patch indices of each image, ascending:
            `patch_predictions.unflatten(0, masked_positions.shape)[b, k]` is the prediction for patch
            `masked_positions[b, k]` of image `b`. `None` for masks of varying counts (use `bool_masked_pos`).
    """

    loss: torch.FloatTensor | None = None
    patch_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    patch_predictions: torch.FloatTensor | None = None
    image_predictions: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    # last, so that the tuple form's earlier positions are unchanged
    bool_masked_pos: torch.BoolTensor | None = None
    masked_positions: torch.LongTensor | None = None


def build_teacher(teacher_config: PreTrainedConfig) -> PreTrainedModel:
    """An untrained backbone for `teacher_config`; its weights come from a checkpoint afterwards.

    A teacher whose model code lives in its own repository is never built from a config here (that would run its
    code without the user's word): `MimCoForPreTraining.from_teacher` with `trust_remote_code` enabled passes it in.
    """
    # by model type: where this file runs as remote code, a MimCo teacher's config class is a copy of MimCoConfig
    if isinstance(teacher_config, MimCoConfig) or teacher_config.model_type == MimCoConfig.model_type:
        return MimCoModel(teacher_config)
    if isinstance(teacher_config, MimCoRemoteTeacherConfig) or type(teacher_config).__module__.startswith(
        "transformers_modules."
    ):
        model_type = getattr(teacher_config, "remote_model_type", None) or teacher_config.model_type
        source = teacher_config._name_or_path or "its own repository"
        raise ValueError(
            f"The teacher ({model_type!r}, from {source}) is a model whose code lives in its own repository, and a "
            "saved MimCo checkpoint does not run that code. Load the student alone (MimCoModel or "
            "MimCoForImageClassification.from_pretrained), or pair a student with the teacher again: "
            "MimCoForPreTraining.from_teacher(TEACHER, config) with trust_remote_code enabled."
        )
    return AutoModel.from_config(teacher_config)


class MimCoForPreTraining(MimCoPreTrainedModel):
    """A MimCo student (`MimCoModel` with patch and image heads) and the frozen teacher it learns from.

    The student sees the masked image, the teacher the whole image. The patch head maps the student's masked patch
    tokens, and the image head its CLS token, to the teacher's width; each is compared with the teacher's tokens by
    the losses that the config selects. The teacher runs in eval mode without gradients, is excluded from
    `parameters()` that require gradients, and keeps its weights bit-identical through training.

    Build it from configs (`MimCoForPreTraining(config)`, teacher weights random), from a trained teacher
    (`MimCoForPreTraining.from_teacher("path/or/hub-id", config)`), or from a saved pre-training checkpoint
    (`from_pretrained`), which holds the teacher too.
    """

    def __init__(self, config: MimCoConfig, teacher: PreTrainedModel | None = None):
        super().__init__(config)
        self.mimco = MimCoModel(config)
        if config.teacher_config is None:
            # The student-shaped default teacher is stored as the sub-config, so that what is set on the config
            # afterwards (`set_attn_implementation`, dtype) reaches the teacher; it starts with the student's kernel.
            teacher_config = config.get_teacher_config()
            teacher_config._attn_implementation = config._attn_implementation
            config.teacher_config = teacher_config
        teacher_config = config.teacher_config
        # `teacher`: an already built teacher (one with remote code, from `from_teacher`); else one from its config
        self.teacher = teacher if teacher is not None else build_teacher(teacher_config)
        self.teacher.eval()
        self.teacher_adapter = TeacherInputAdapter(
            self.teacher,
            teacher_config,
            student_grid_size=config.image_size // config.patch_size,
            student_mean=config.image_mean,
            student_std=config.image_std,
            teacher_mean=config.teacher_image_mean,
            teacher_std=config.teacher_image_std,
        )
        teacher_hidden_size = teacher_config.hidden_size
        self.patch_head = None
        self.image_head = None
        if config.patch_loss_weight > 0:
            self.patch_head = MimCoPredictionHead(
                config.hidden_size, config.head_hidden_size, teacher_hidden_size, config.hidden_act
            )
        if config.image_loss_weight > 0:
            self.image_head = MimCoPredictionHead(
                config.hidden_size, config.head_hidden_size, teacher_hidden_size, config.hidden_act
            )
        self.mask_generator = MimCoMaskGenerator.from_config(config)
        self.post_init()
        self.freeze_untrained_parameters()

    def freeze_untrained_parameters(self) -> None:
        super().freeze_untrained_parameters()
        self.teacher.requires_grad_(False)

    @classmethod
    def from_teacher(
        cls, teacher_name_or_path: str, config: MimCoConfig | None = None, **kwargs
    ) -> MimCoForPreTraining:
        """A randomly initialised student paired with a pre-trained teacher.

        Args:
            teacher_name_or_path: A local folder or Hub id of the teacher: a `MimCoModel` or any ViT-like
                backbone that `AutoModel` loads. Its `preprocessor_config.json`, when present, sets the teacher's
                pixel normalisation.
            config: The student's config; its `teacher_config` is replaced by the teacher's. Defaults to a
                `MimCoConfig` with the teacher's image size.
            kwargs: Passed to the teacher's `from_pretrained` (`revision`, `token`, ...).
        """
        teacher_config = PreTrainedConfig.get_config_dict(teacher_name_or_path, **kwargs)[0]
        if teacher_config.get("model_type") == MimCoConfig.model_type:
            teacher = MimCoModel.from_pretrained(teacher_name_or_path, **kwargs)
        else:
            teacher = AutoModel.from_pretrained(teacher_name_or_path, **kwargs)
        if config is None:
            config = MimCoConfig(image_size=getattr(teacher.config, "image_size", 224))
        else:
            config = MimCoConfig.from_dict(config.to_dict())
        config.teacher_config = teacher.config
        teacher_mean, teacher_std = _load_pixel_normalisation(teacher_name_or_path, **kwargs)
        if teacher_mean is not None:
            config.teacher_image_mean, config.teacher_image_std = teacher_mean, teacher_std
        config.validate()
        teacher_state = {name: value.detach().clone() for name, value in teacher.state_dict().items()}
        has_remote_code = type(teacher.config).__module__.startswith("transformers_modules.")
        # a teacher with remote code was built by the user's own `trust_remote_code`; it is used as it is
        model = cls(config, teacher=teacher if has_remote_code else None)
        model.teacher.load_state_dict(teacher_state)
        return model

    def train(self, mode: bool = True) -> MimCoForPreTraining:
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's CLS feature `(batch, teacher_dim)` and patch tokens `(batch, num_patches, teacher_dim)`
        for the unmasked images. They carry no gradient."""
        # `no_grad`, not `inference_mode`: inference tensors cannot be saved for the losses' backward, and
        # `torch.compile` of the whole model cannot trace them ("Cannot set version_counter for inference tensor")
        with torch.no_grad():
            teacher_inputs = self.teacher_adapter.teacher_inputs(pixel_values)  # re-normalised in full precision
            if self.config.teacher_autocast is None:
                # not `autocast(enabled=False)`, which would also switch off a bf16 autocast around the whole step
                last_hidden_state = self.teacher(**teacher_inputs).last_hidden_state
            else:
                with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16):
                    last_hidden_state = self.teacher(**teacher_inputs).last_hidden_state
                last_hidden_state = last_hidden_state.to(pixel_values.dtype)
        return self.teacher_adapter.split_tokens(last_hidden_state)

    def _patch_loss(
        self,
        student_tokens: torch.Tensor,
        teacher_patch_tokens: torch.Tensor,
        bool_masked_pos: torch.BoolTensor,
        masked_positions: torch.LongTensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The patch loss and the patch head's predictions for the masked patches; `(None, None)` without a head.
        `masked_positions`: `self.masked_positions(bool_masked_pos)`."""
        if self.patch_head is None:
            return None, None
        config = self.config
        # Only masked patches are predicted, so the head never runs on the visible ones.
        # The head runs on (num_masked_in_batch, width) rows either way, so that the predictions it returns, in the
        # row-major order of `bool_masked_pos.nonzero()`, are a tensor of their own: a view (a reshape of the head's
        # output) returned by an FSDP2 root would lose its pre-backward hook on an in-place op, and FSDP2 warns.
        if masked_positions is None:
            # masks of varying counts: a boolean index, whose shape depends on the data
            patch_predictions = self.patch_head(student_tokens[:, 1:][bool_masked_pos])
            predictions_for_loss = patch_predictions
        else:
            masked_tokens = gather_tokens(student_tokens[:, 1:], masked_positions)
            patch_predictions = self.patch_head(masked_tokens.flatten(0, 1))
            predictions_for_loss = patch_predictions.unflatten(0, masked_positions.shape)
        patch_loss = compute_patch_loss(
            predictions_for_loss,
            teacher_patch_tokens,
            bool_masked_pos,
            config.patch_loss_type,
            temperature=config.patch_temperature,
            negatives=config.patch_negatives,
            masked_positions=masked_positions,
        )
        return patch_loss, patch_predictions

    def masked_positions(self, bool_masked_pos: torch.BoolTensor) -> torch.LongTensor | None:
        """The masked patch indices `(batch_size, num_masked)`, ascending per image, when every image masks as many
        patches (every mask the package draws does); `None` for masks of varying counts, which take the general path.

        Under `torch.compile` the count is taken to be the mask generator's `num_masked` without looking at the
        data (reading it would break the graph); a device-side assertion stops a mask that does not match.
        """
        num_patches = bool_masked_pos.shape[1]
        if torch.compiler.is_compiling():
            num_masked = self.mask_generator.num_masked
            counts = bool_masked_pos.sum(1)
            torch._assert_async(
                (counts == num_masked).all(), "under torch.compile every mask must hide the config's num_masked"
            )
        else:
            counts = bool_masked_pos.sum(1).tolist()
            if min(counts, default=0) != max(counts, default=0) or not counts:
                return None
            num_masked = counts[0]
        # masked patches first, each image's in ascending order: a key that sorts them and is unique per position
        position = torch.arange(num_patches, device=bool_masked_pos.device)
        keys = bool_masked_pos.to(torch.int32) * num_patches + (num_patches - 1 - position)
        return keys.topk(num_masked, dim=1).indices

    def _image_loss(
        self, student_tokens: torch.Tensor, teacher_image_features: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The image loss and the image head's predictions from the CLS token; `(None, None)` without a head."""
        if self.image_head is None:
            return None, None
        image_predictions = self.image_head(student_tokens[:, 0])
        image_loss = compute_image_loss(
            image_predictions,
            teacher_image_features,
            self.config.image_loss_type,
            temperature=self.config.image_temperature,
        )
        return image_loss, image_predictions

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        sample_seeds: torch.LongTensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> MimCoForPreTrainingOutput:
        r"""
        Every argument is named here: any other keyword is a `TypeError` (`return_dict` excepted).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                The unmasked images, normalised with the config's `image_mean`/`image_std`.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
                `True` for the patches the student sees masked. When omitted, the config's mask generator draws
                one mask per image.
            sample_seeds (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Per-image seeds of the student's stochastic depth and dropout (see `MimCoModel.forward`).
            head_mask (`torch.Tensor` of shape `(num_heads,)` or `(num_hidden_layers, num_heads)`, *optional*):
                The student's head mask (see `MimCoModel.forward`); the teacher always runs whole.

        Returns:
            `MimCoForPreTrainingOutput`, with the mask the student saw (`bool_masked_pos`) and, for masks of equal
            counts, `masked_positions`, which place each row of `patch_predictions` on the patch grid.
        """
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`.")
        if bool_masked_pos is None:
            bool_masked_pos = self.mask_generator.batch(pixel_values.shape[0])
        bool_masked_pos = bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool)

        student_outputs = self.mimco(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            sample_seeds=sample_seeds,
            head_mask=head_mask,
        )
        student_tokens = student_outputs.last_hidden_state
        teacher_image_features, teacher_patch_tokens = self.teacher_features(pixel_values)
        masked_positions = self.masked_positions(bool_masked_pos)
        patch_loss, patch_predictions = self._patch_loss(
            student_tokens, teacher_patch_tokens, bool_masked_pos, masked_positions
        )
        image_loss, image_predictions = self._image_loss(student_tokens, teacher_image_features)

        loss = 0.0
        if patch_loss is not None:
            loss = loss + self.config.patch_loss_weight * patch_loss
        if image_loss is not None:
            loss = loss + self.config.image_loss_weight * image_loss
        return MimCoForPreTrainingOutput(
            loss=loss,
            patch_loss=patch_loss,
            image_loss=image_loss,
            patch_predictions=patch_predictions,
            image_predictions=image_predictions,
            last_hidden_state=student_tokens,
            hidden_states=student_outputs.hidden_states,
            attentions=student_outputs.attentions,
            bool_masked_pos=bool_masked_pos,
            masked_positions=masked_positions,
        )


class MimCoForImageClassification(MimCoPreTrainedModel):
    """A MimCo backbone with a linear classifier on its pooled output (CLS token or normalised mean, per
    `config.pooling`). Loads the student of any MimCo checkpoint; a pre-training checkpoint's teacher and heads are
    skipped."""

    def __init__(self, config: MimCoConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mimco = MimCoModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()
        self.freeze_untrained_parameters()

    def freeze_untrained_parameters(self) -> None:
        super().freeze_untrained_parameters()
        # A classifier never masks. Its mask token stays, so that every MimCo checkpoint loads into it as it is, but
        # frozen: a trainable parameter that never gets a gradient stalls DDP without `find_unused_parameters`.
        self.mimco.embeddings.mask_token.requires_grad_(False)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> ImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices for a cross-entropy loss (or float targets for regression / multi-label classification,
            following `config.problem_type`).
        attention_mask, head_mask (*optional*): as `MimCoModel.forward`'s.

        Every argument is named here: any other keyword is a `TypeError` (`return_dict` excepted). So the Trainer
        passes no `num_items_in_batch`, and divides this mean loss by its gradient-accumulation steps itself.
        """
        outputs = self.mimco(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_mask=attention_mask,
            head_mask=head_mask,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class MimCoLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a `(batch, channels, height, width)` map (as ViTDet's
    pyramid): unlike BatchNorm, it does not depend on the batch, which dense fine-tuning keeps small per device."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MimCoFeaturePyramid(nn.Module):
    """A simple feature pyramid from four single-scale ViT maps (ViTDet; BEiT's `add_fpn`).

    Each input is a `(batch, hidden_size, h, w)` map on the patch grid (`h = height / patch_size`). The first becomes
    `(batch, hidden_size, 4h, 4w)` (two stride-2 transposed convolutions with a LayerNorm and GELU between them), the
    second `(batch, hidden_size, 2h, 2w)` (one), the third is kept as it is, and the fourth is max-pooled to
    `(batch, hidden_size, h // 2, w // 2)`.
    """

    def __init__(self, config: MimCoConfig):
        super().__init__()
        width = config.hidden_size
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            MimCoLayerNorm2d(width, eps=config.layer_norm_eps),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.upsample_2x = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Four patch-grid maps (shallowest stage first) to the maps at 4x, 2x, 1x and 1/2x the grid."""
        return (
            self.upsample_4x(feature_maps[0]),
            self.upsample_2x(feature_maps[1]),
            feature_maps[2],
            self.downsample_2x(feature_maps[3]),
        )


class MimCoBackbone(BackboneMixin, MimCoPreTrainedModel):
    """The MimCo encoder as a transformers backbone: the outputs of the `config.out_features` stages as feature maps,
    for dense decoders (`UperNetForSemanticSegmentation`, DPT, ...) through `AutoBackbone` or `backbone_config`.

    Stage `"stem"` is the embeddings, `"stageN"` the output of block N. Each returned stage is normalised by the
    encoder's final LayerNorm (`config.apply_layernorm`) and, without its CLS token, reshaped to a map `(batch,
    hidden_size, height / patch_size, width / patch_size)` (`config.reshape_hidden_states`). With
    `config.use_feature_pyramid`, the 4 maps go through `MimCoFeaturePyramid` (4x, 2x, 1x, 1/2x the patch grid).

    Loads the encoder of any MimCo checkpoint: a `MimCoModel` or classifier folder, or a stage-2 pre-training folder
    whose teacher and heads are skipped; the pyramid's layers, which no such folder holds, start from
    `_init_weights`. Inputs of any size whose sides are multiples of `patch_size` work: the position embeddings are
    resampled to the input's patch grid.
    """

    # Besides a pre-training folder's teacher and heads, a classifier folder's head is not part of the backbone.
    _keys_to_ignore_on_load_unexpected = [*MimCoPreTrainedModel._keys_to_ignore_on_load_unexpected, r"^classifier\."]

    def __init__(self, config: MimCoConfig):
        super().__init__(config)
        # checked here too: `out_features` may have been changed on the config since it was validated
        check_feature_pyramid(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.mimco = MimCoModel(config)
        self.pyramid = MimCoFeaturePyramid(config) if config.use_feature_pyramid else None
        self.post_init()
        self.freeze_untrained_parameters()

    def freeze_untrained_parameters(self) -> None:
        super().freeze_untrained_parameters()
        # Parameters that the backbone's forward never uses, frozen so that DDP without `find_unused_parameters`
        # does not wait for their gradients: the mask token (a backbone never masks), the mean-pooling norm, and the
        # final norm when the stages are returned unnormalised. They are kept so that every MimCo folder loads as is.
        self.mimco.embeddings.mask_token.requires_grad_(False)
        if self.mimco.pooler_norm is not None:
            self.mimco.pooler_norm.requires_grad_(False)
        if not self.config.apply_layernorm:
            self.mimco.layernorm.requires_grad_(False)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; `height` and `width` are multiples of `patch_size` (any, not only `image_size`).
            output_hidden_states (`bool`, *optional*):
                Also return the embeddings and every block's output, `(batch_size, 1 + num_patches, hidden_size)`
                each, before any normalisation; or indices into them, the others then `None` (as `MimCoModel`).
            output_attentions (`bool`, *optional*):
                Also return each block's attention probabilities `(batch_size, num_heads, tokens, tokens)`.
            return_dict (`bool`, *optional*):
                `False` returns a tuple of the outputs that are not `None`.
            interpolate_pos_encoding (`bool`, *optional*):
                Taken because decoders pass it to ViT-like backbones; it changes nothing: the positions are always
                resampled to the input's patch grid.
            attention_mask, head_mask (*optional*): as `MimCoModel.forward`'s.

        Any other keyword is a `TypeError`, never silently ignored.

        Returns:
            `BackboneOutput`: `feature_maps`, one tensor per `out_features` stage in `stage_names` order: `(batch_size,
            hidden_size, height / patch_size, width / patch_size)`; `(batch_size, 1 + num_patches, hidden_size)`
            without `reshape_hidden_states`; with `use_feature_pyramid`, the 4 maps at 4x, 2x, 1x and 1/2x that grid.
        """
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`.")
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        return_dict = return_dict if return_dict is not None else config.return_dict

        batch_size, _, height, width = pixel_values.shape
        grid_height, grid_width = height // config.patch_size, width // config.patch_size
        # Always resampled to the input's grid: at `image_size` that is the trained table itself, and dense tasks
        # run at other sizes (512-pixel crops...) without a flag that a decoder would not know to pass.
        hidden_state = self.mimco.embeddings(pixel_values, interpolate_pos_encoding=True)
        attention_mask = prepare_attention_mask(
            attention_mask, hidden_state, "eager" if output_attentions else config._attn_implementation
        )
        head_masks = prepare_head_mask(head_mask, len(self.mimco.layers), config.num_attention_heads)
        hidden_states = (hidden_state,)
        attentions = () if output_attentions else None
        for layer, layer_head_mask in zip(self.mimco.layers, head_masks):
            hidden_state, attn_weights = layer(
                hidden_state, output_attentions, attention_mask=attention_mask, head_mask=layer_head_mask
            )
            hidden_states += (hidden_state,)
            if output_attentions:
                attentions += (attn_weights,)

        feature_maps = self._feature_maps(hidden_states, batch_size, grid_height, grid_width)

        # an index 0 selects the embeddings: only `None` and `False` mean "no hidden states"
        returns_hidden_states = output_hidden_states is not None and output_hidden_states is not False
        output = BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=_select_hidden_states(hidden_states, output_hidden_states)
            if returns_hidden_states
            else None,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()

    def _feature_maps(
        self, hidden_states: tuple[torch.Tensor, ...], batch_size: int, grid_height: int, grid_width: int
    ) -> tuple[torch.Tensor, ...]:
        """The `out_features` stages of `hidden_states` (the embeddings, then every block's output), normalised and
        reshaped to maps as the config asks, and through the feature pyramid when there is one."""
        config = self.config
        feature_maps = ()
        for stage, stage_output in zip(self.stage_names, hidden_states):
            if stage not in self.out_features:
                continue
            if config.apply_layernorm:
                stage_output = self.mimco.layernorm(stage_output)
            if config.reshape_hidden_states:
                # patch tokens in row-major grid order -> (batch, hidden_size, grid_height, grid_width)
                stage_output = stage_output[:, 1:].transpose(1, 2)
                stage_output = stage_output.reshape(batch_size, -1, grid_height, grid_width).contiguous()
            feature_maps += (stage_output,)
        if self.pyramid is not None:
            feature_maps = self.pyramid(feature_maps)
        return feature_maps


def _load_pixel_normalisation(name_or_path: str, **kwargs) -> tuple[list[float] | None, list[float] | None]:
    """The `image_mean`/`image_std` of a checkpoint's `preprocessor_config.json`, or `(None, None)` without one."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **kwargs)
    except OSError:
        return None, None
    mean, std = processor_dict.get("image_mean"), processor_dict.get("image_std")
    if mean is None or std is None:
        return None, None
    return list(mean), list(std)


MIMCO_AUTO_MAP = {
    "AutoConfig": "configuration_mimco.MimCoConfig",
    "AutoModel": "modeling_mimco.MimCoModel",
    "AutoModelForPreTraining": "modeling_mimco.MimCoForPreTraining",
    "AutoModelForImageClassification": "modeling_mimco.MimCoForImageClassification",
    "AutoBackbone": "modeling_mimco.MimCoBackbone",
}

# Stage 1 lives in `modeling_mimco_contrastive.py`, and its names are imported from there only: none of them resolves
# here. This module does not import stage 1, since a `from .` import line would make `save_pretrained` copy stage 1
# into every stage-2 folder.
# Marked for remote code where the class is defined, so that every `save_pretrained` writes the `auto_map` and copies
# the model files, however the class was imported (the package's Auto-class registration is separate, and lazy).
MimCoModel.register_for_auto_class("AutoModel")
MimCoForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MimCoForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MimCoBackbone.register_for_auto_class("AutoBackbone")


__all__ = [
    "MimCoBackbone",
    "MimCoFeaturePyramid",
    "MimCoForImageClassification",
    "MimCoForPreTraining",
    "MimCoForPreTrainingOutput",
    "MimCoModel",
    "MimCoPreTrainedModel",
    "PRETRAINING_ONLY_PREFIXES",
    "build_teacher",
    "get_2d_sincos_position_embeddings",
    "pixel_normalisation",
    "stock_image_processor",
    "resample_position_embeddings",
]
