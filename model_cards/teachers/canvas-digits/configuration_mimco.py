"""Configuration of MimCo models: the ViT backbone, the masking, the heads, the losses and the teacher."""

from __future__ import annotations

import numbers

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.models.upernet.configuration_upernet import UperNetConfig


IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]

POSITION_EMBEDDING_TYPES = ("learned", "sincos")
POOLING_TYPES = ("cls", "mean")
MASK_STRATEGIES = ("random", "block")
LOSS_TYPES = ("infonce", "cosine", "smooth_l1")
PATCH_NEGATIVES = ("image", "batch")
TEACHER_AUTOCAST_DTYPES = ("bf16",)


def _teacher_config_from_dict(teacher_config: dict) -> PreTrainedConfig:
    """Builds the teacher sub-config from its serialised form.

    A MimCo teacher is resolved here rather than through `AutoConfig`, so that a checkpoint loaded as remote code
    (where `mimco` is not a registered model type) still finds its teacher's config class.
    """
    teacher_config = dict(teacher_config)
    model_type = teacher_config.pop("model_type", None)
    if model_type is None or model_type == MimCoConfig.model_type:
        return MimCoConfig(**teacher_config)

    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type](**teacher_config)
    if "auto_map" in teacher_config:
        # a teacher whose code lives in its own repository: kept as saved, without running that code
        return MimCoRemoteTeacherConfig(remote_model_type=model_type, **teacher_config)
    raise ValueError(
        f"`teacher_config` has model_type {model_type!r}, which this transformers installation does not know."
    )


class MimCoRemoteTeacherConfig(PreTrainedConfig):
    """The saved config of a teacher whose model code lives in its own repository (an `auto_map`).

    Reading a MimCo checkpoint never runs a teacher's remote code: its config is kept as it was saved (`to_dict`
    gives it back unchanged, so the checkpoint saves again as it was), which is all the student needs. Only
    `MimCoForPreTraining.from_teacher` with `trust_remote_code` enabled builds such a teacher.
    """

    model_type = "mimco_remote_teacher"

    def __init__(self, remote_model_type: str = "", **kwargs):
        self.remote_model_type = remote_model_type
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("remote_model_type", None)
        output["model_type"] = self.remote_model_type
        return output


@strict
class MimCoConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a MimCo Vision Transformer and of its masked-image pre-training with a contrastive teacher.

    The defaults describe a ViT-S/16 at 224 pixels pre-trained as in the MimCo paper (arXiv 2209.03063): 60 % of the
    image masked in 32x32-pixel blocks, MLP heads, InfoNCE patch and image losses at temperature 0.2.

    Args:
        image_size (`int`, defaults to 224): Height and width of the (square) input images, in pixels.
        patch_size (`int`, defaults to 16): Height and width of each patch, in pixels.
        num_channels (`int`, defaults to 3): Number of input channels.
        hidden_size (`int`, defaults to 384): Width of the transformer.
        num_hidden_layers (`int`, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, defaults to 6): Number of attention heads in each block.
        intermediate_size (`int`, defaults to 1536): Width of the MLP inside each block.
        hidden_act (`str`, defaults to `"gelu"`): Activation of the block MLPs and of the pre-training heads.
        layer_norm_eps (`float`, defaults to 1e-6): Epsilon of every LayerNorm.
        qkv_bias (`bool`, defaults to `True`): Whether the fused query/key/value projection has a bias.
        hidden_dropout_prob (`float`, defaults to 0.0): Dropout on embeddings and on the residual branches.
        attention_probs_dropout_prob (`float`, defaults to 0.0): Dropout on the attention probabilities.
        drop_path_rate (`float`, defaults to 0.0): Stochastic depth rate of the last block; it rises linearly from 0
            in the first block.
        initializer_range (`float`, defaults to 0.02): Standard deviation of the truncated normal initialisation.
        position_embedding_type (`str`, defaults to `"learned"`): `"learned"` position embeddings, or fixed 2-D
            `"sincos"` ones (as in MoCo v3 and MAE), which are not trained.
        pooling (`str`, defaults to `"cls"`): `"cls"` pools the final CLS token; `"mean"` averages the patch tokens
            before the final norm and normalises the average with its own LayerNorm (`pooler_norm`).
        mask_strategy (`str`, defaults to `"random"`): `"random"` masks random `mask_patch_size` blocks (SimMIM);
            `"block"` masks rectangles of patches (BEiT block-wise masking).
        mask_ratio (`float`, defaults to 0.6): Fraction of patches to mask, in (0, 1).
        mask_patch_size (`int`, defaults to 32): Side in pixels of the square blocks that random masking hides; a
            multiple of `patch_size` that divides `image_size`.
        head_hidden_size (`int`, defaults to 2048): Hidden width of the patch and image heads; 0 makes them linear.
        patch_loss_type (`str`, defaults to `"infonce"`): `"infonce"`, `"cosine"` or `"smooth_l1"`.
        image_loss_type (`str`, defaults to `"infonce"`): `"infonce"`, `"cosine"` or `"smooth_l1"`.
        patch_negatives (`str`, defaults to `"image"`): Negatives of the patch InfoNCE loss: the other teacher patch
            tokens of the same `"image"`, or every teacher patch token of the local `"batch"`.
        patch_temperature (`float`, defaults to 0.2): Temperature of the patch InfoNCE loss.
        image_temperature (`float`, defaults to 0.2): Temperature of the image InfoNCE loss.
        patch_loss_weight (`float`, defaults to 1.0): Weight of the patch loss in the total; 0 disables it.
        image_loss_weight (`float`, defaults to 1.0): Weight of the image loss in the total; 0 disables it.
        image_mean (`list[float]`): Per-channel mean with which the student's `pixel_values` were normalised. A
            single number stands for every channel, as in transformers' image processors.
        image_std (`list[float]`): Per-channel standard deviation with which the student's `pixel_values` were
            normalised; a single number stands for every channel.
        teacher_config (`PreTrainedConfig` or `dict`, *optional*): Config of the frozen teacher: a `MimCoConfig` or
            the config of any Hugging Face ViT-like backbone (`ViTConfig`, `Dinov2Config`...). `None` means a teacher
            with the student's own backbone shape, which `MimCoForPreTraining` sets here when it is built. It is a
            sub-config: attention implementation and dtype set on this config reach it.
        teacher_image_mean (`list[float]`, *optional*): The teacher's pixel normalisation mean; defaults to
            `image_mean`.
        teacher_image_std (`list[float]`, *optional*): The teacher's pixel normalisation std; defaults to
            `image_std`.
        teacher_autocast (`str`, *optional*): `"bf16"` runs the frozen teacher under bfloat16 autocast while the
            student keeps its own precision (e.g. fp32); its targets are cast back before the losses, which
            L2-normalise them. `None` (default): the teacher runs in the student's precision.
        out_features (`list[str]`, *optional*): The stages whose output `MimCoBackbone` returns, among
            `stage_names`: `"stem"` (the embeddings) and `"stage1"` ... `"stage{num_hidden_layers}"` (the blocks'
            outputs). Defaults to the last stage; set with `out_indices`, both must name the same stages.
        out_indices (`list[int]`, *optional*): The same stages as indices into `stage_names` (negative ones count
            from the end).
        apply_layernorm (`bool`, defaults to `True`): `MimCoBackbone` normalises each returned stage with the
            encoder's final LayerNorm.
        reshape_hidden_states (`bool`, defaults to `True`): `MimCoBackbone` returns each stage as a map `(batch_size,
            hidden_size, height / patch_size, width / patch_size)` of its patch tokens; `False` returns the tokens
            `(batch_size, 1 + num_patches, hidden_size)`, CLS first.
        use_feature_pyramid (`bool`, defaults to `False`): `MimCoBackbone` turns its 4 stages (exactly 4
            `out_features`) into a simple feature pyramid for dense decoders such as UperNet: maps at 4x, 2x, 1x and
            1/2x the patch grid, in that order (ViTDet, BEiT's FPN).

    Example:

    ```python
    >>> from modeling_mimco import MimCoConfig, MimCoForPreTraining

    >>> config = MimCoConfig(image_size=32, patch_size=4, mask_patch_size=8, hidden_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=2, intermediate_size=128)
    >>> model = MimCoForPreTraining(config)
    ```"""

    model_type = "mimco"
    # The teacher may be any ViT-like config. Declared so that the attention-implementation and dtype setters, and
    # `from_pretrained(attn_implementation=...)`, reach it as they reach any composite model's sub-model; the dict
    # form is resolved in `__post_init__` (also where `mimco` is not a registered model type, as in remote code).
    sub_configs = {"teacher_config": AutoConfig}

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    position_embedding_type: str = "learned"
    pooling: str = "cls"

    mask_strategy: str = "random"
    mask_ratio: float = 0.6
    mask_patch_size: int = 32

    head_hidden_size: int = 2048

    patch_loss_type: str = "infonce"
    image_loss_type: str = "infonce"
    patch_negatives: str = "image"
    patch_temperature: float = 0.2
    image_temperature: float = 0.2
    patch_loss_weight: float | int = 1.0
    image_loss_weight: float | int = 1.0

    image_mean: list[float] | tuple[float, ...] | float | None = None
    image_std: list[float] | tuple[float, ...] | float | None = None
    teacher_config: dict | PreTrainedConfig | None = None
    teacher_image_mean: list[float] | tuple[float, ...] | float | None = None
    teacher_image_std: list[float] | tuple[float, ...] | float | None = None
    teacher_autocast: str | None = None

    # `MimCoBackbone` (transformers' backbone convention; `out_features` / `out_indices` are set in `__post_init__`)
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
    use_feature_pyramid: bool = False

    def __post_init__(self, **kwargs):
        # derived from the depth; a saved `stage_names` (written by `to_dict`) is not read back
        kwargs.pop("stage_names", None)
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_features=kwargs.pop("out_features", None), out_indices=kwargs.pop("out_indices", None)
        )
        channels = self.num_channels
        self.image_mean = _per_channel("image_mean", self.image_mean, channels, IMAGENET_DEFAULT_MEAN)
        self.image_std = _per_channel("image_std", self.image_std, channels, IMAGENET_DEFAULT_STD)
        self.teacher_image_mean = _per_channel(
            "teacher_image_mean", self.teacher_image_mean, channels, self.image_mean
        )
        self.teacher_image_std = _per_channel("teacher_image_std", self.teacher_image_std, channels, self.image_std)
        if isinstance(self.teacher_config, dict):
            self.teacher_config = _teacher_config_from_dict(self.teacher_config)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: every error names the offending field and value."""
        _check_positive_int("image_size", self.image_size)
        _check_positive_int("patch_size", self.patch_size)
        _check_positive_int("num_channels", self.num_channels)
        _check_positive_int("hidden_size", self.hidden_size)
        _check_positive_int("num_hidden_layers", self.num_hidden_layers)
        _check_positive_int("num_attention_heads", self.num_attention_heads)
        _check_positive_int("intermediate_size", self.intermediate_size)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by `patch_size` ({self.patch_size})."
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1, got {self.mask_ratio}.")
        if self.mask_patch_size <= 0 or self.mask_patch_size % self.patch_size != 0:
            raise ValueError(
                f"`mask_patch_size` ({self.mask_patch_size}) must be a positive multiple of `patch_size` "
                f"({self.patch_size})."
            )
        if self.image_size % self.mask_patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by `mask_patch_size` ({self.mask_patch_size})."
            )
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("pooling", self.pooling, POOLING_TYPES)
        _check_choice("mask_strategy", self.mask_strategy, MASK_STRATEGIES)
        if self.teacher_autocast is not None:
            _check_choice("teacher_autocast", self.teacher_autocast, TEACHER_AUTOCAST_DTYPES)
        _check_choice("patch_loss_type", self.patch_loss_type, LOSS_TYPES)
        _check_choice("image_loss_type", self.image_loss_type, LOSS_TYPES)
        _check_choice("patch_negatives", self.patch_negatives, PATCH_NEGATIVES)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1), got {value}.")
        if self.head_hidden_size < 0:
            raise ValueError(f"`head_hidden_size` must be >= 0 (0 means a linear head), got {self.head_hidden_size}.")
        for name in ("patch_temperature", "image_temperature", "layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}.")
        for name in ("patch_loss_weight", "image_loss_weight"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if self.patch_loss_weight == 0 and self.image_loss_weight == 0:
            raise ValueError("`patch_loss_weight` and `image_loss_weight` are both 0: at least one loss must be used.")
        for name in ("image_mean", "image_std", "teacher_image_mean", "teacher_image_std"):
            # a value assigned after construction has not been through `__post_init__`: check its type here too
            values = _per_channel(name, getattr(self, name), self.num_channels)
            if len(values) != self.num_channels:
                raise ValueError(
                    f"`{name}` has {len(values)} values but `num_channels` is {self.num_channels}: give one per channel."
                )
            if name.endswith("_std") and any(v <= 0 for v in values):
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        check_feature_pyramid(self)
        if self.teacher_config is not None:
            for name in ("hidden_size", "patch_size"):
                if getattr(self.teacher_config, name, None) is None:
                    raise ValueError(
                        f"`teacher_config` ({type(self.teacher_config).__name__}) has no `{name}`: the teacher must be "
                        "a ViT-like backbone with a CLS token and patch tokens."
                    )

    @property
    def num_patches(self) -> int:
        """Number of patch tokens of an `image_size` input."""
        return (self.image_size // self.patch_size) ** 2

    def get_teacher_config(self) -> PreTrainedConfig:
        """The teacher's config; without an explicit one, a frozen copy of the student's backbone shape."""
        if self.teacher_config is not None:
            return self.teacher_config
        backbone_fields = (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "layer_norm_eps",
            "qkv_bias",
            "initializer_range",
            "position_embedding_type",
            "image_mean",
            "image_std",
            # never used by a teacher, but validated: the student's values are valid for its shape, the defaults
            # (32-px mask blocks) are not for every image size
            "mask_strategy",
            "mask_ratio",
            "mask_patch_size",
        )
        return MimCoConfig(**{name: getattr(self, name) for name in backbone_fields})


def check_feature_pyramid(config: MimCoConfig) -> None:
    """A `ValueError` unless `use_feature_pyramid` has what it needs: exactly 4 `out_features` (one per level) and
    feature maps rather than token sequences (`reshape_hidden_states`)."""
    if not config.use_feature_pyramid:
        return
    out_features = list(config.out_features or [])
    if len(out_features) != 4:
        raise ValueError(
            f"`use_feature_pyramid` needs exactly 4 `out_features` (the stages of its 4x, 2x, 1x and 1/2x maps, e.g. "
            f"['stage3', 'stage6', 'stage9', 'stage12'] for 12 blocks), got {len(out_features)}: {out_features}."
        )
    if not config.reshape_hidden_states:
        raise ValueError("`use_feature_pyramid` needs `reshape_hidden_states=True`: the pyramid is built from maps.")


def _per_channel(name: str, value, num_channels: int, default: list[float] | None = None) -> list[float]:
    """`value` as a list of per-channel floats: a list or tuple of numbers, or one number for every channel (as in
    transformers' image processors); `None` gives a copy of `default`. Anything else raises a `ValueError` naming
    `name`."""
    if value is None and default is not None:
        return list(default)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [float(value)] * num_channels
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"`{name}` must be a list of numbers (one per channel) or a single number, got {value!r}.")
    return [float(v) for v in value]


def _check_positive_int(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value}.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


@strict
class MimCoContrastiveConfig(PreTrainedConfig):
    r"""
    Configuration of the stage-1 contrastive teacher (MoCo v3 for ViTs): a `MimCoModel` base encoder with a
    projector and a predictor, and a momentum copy of encoder and projector that provides the keys.

    Args:
        backbone_config (`MimCoConfig` or `dict`, *optional*): The ViT that is trained and exported as the stage-2
            teacher. Defaults to `MimCoConfig(position_embedding_type="sincos")`, as MoCo v3 uses fixed position
            embeddings.
        projector_hidden_size (`int`, defaults to 4096): Hidden width of the 3-layer projector and the 2-layer
            predictor (both with BatchNorm).
        projection_size (`int`, defaults to 256): Output width of projector and predictor.
        temperature (`float`, defaults to 0.2): InfoNCE temperature; the loss is scaled by `2 * temperature`.
        momentum (`float`, defaults to 0.99): Initial EMA momentum of the momentum encoder.
        momentum_final (`float`, defaults to 1.0): Momentum at the end of training, reached on a cosine schedule.
        freeze_patch_embeddings (`bool`, defaults to `False`): Keep the patch projection at its random
            initialisation, which MoCo v3 reports to stabilise ViT training.
    """

    model_type = "mimco_contrastive"
    # declared so that the attention-implementation and dtype setters reach the backbone, as in composite models
    sub_configs = {"backbone_config": MimCoConfig}

    backbone_config: dict | PreTrainedConfig | None = None
    projector_hidden_size: int = 4096
    projection_size: int = 256
    temperature: float = 0.2
    momentum: float = 0.99
    momentum_final: float = 1.0
    freeze_patch_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            self.backbone_config = MimCoConfig(position_embedding_type="sincos")
        elif isinstance(self.backbone_config, dict):
            self.backbone_config = MimCoConfig(**{k: v for k, v in self.backbone_config.items() if k != "model_type"})
        super().__post_init__(**kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """As `PreTrainedConfig.get_config_dict`; a backbone checkpoint's (`MimCoConfig`) config becomes the
        `backbone_config` of a stage-1 config, so that `MimCoForContrastivePreTraining.from_pretrained` can start
        from any MimCo backbone."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == MimCoConfig.model_type:
            config_dict = {"backbone_config": config_dict}
        return config_dict, kwargs

    def validate_architecture(self):
        """Part of `@strict` validation: every error names the offending field and value."""
        if not isinstance(self.backbone_config, MimCoConfig):
            raise ValueError(f"`backbone_config` must be a MimCoConfig, got {type(self.backbone_config).__name__}.")
        _check_positive_int("projector_hidden_size", self.projector_hidden_size)
        _check_positive_int("projection_size", self.projection_size)
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        for name in ("momentum", "momentum_final"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1], got {value}.")


class MimCoUperNetConfig(UperNetConfig):
    r"""
    Configuration of `MimCoForSemanticSegmentation`: transformers' `UperNetConfig` (the UperNet head, the auxiliary
    FCN head, the loss) whose `backbone_config` is a `MimCoConfig`.

    It keeps `model_type = "upernet"`, so that its `config.json` is an UperNet config: where `modeling_mimco` is
    installed, `UperNetForSemanticSegmentation.from_pretrained` reads the folder as it always did. What it adds is
    that it builds the `MimCoConfig` itself, so that the folder's own copy of this file reads it where transformers
    does not know `model_type` "mimco" (remote code).

    Args:
        backbone_config (`MimCoConfig` or `dict`, *optional*): The MimCo backbone (its `out_features` are the maps
            that UperNet reads). Defaults to `MimCoConfig()`.
        Every other argument is `UperNetConfig`'s.
    """

    # declared so that the attention-implementation and dtype setters reach the backbone, as in composite models
    sub_configs_defaults = {"backbone_config": MimCoConfig}

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            self.backbone_config = MimCoConfig()
        elif isinstance(self.backbone_config, dict):
            model_type = self.backbone_config.get("model_type", MimCoConfig.model_type)
            if model_type != MimCoConfig.model_type:
                raise ValueError(f"`backbone_config` must be a MimCo config, got model_type {model_type!r}.")
            self.backbone_config = MimCoConfig.from_dict(self.backbone_config)
        elif not isinstance(self.backbone_config, MimCoConfig):
            raise ValueError(f"`backbone_config` must be a MimCoConfig, got {type(self.backbone_config).__name__}.")
        super().__post_init__(**kwargs)


class MimCoConfigValidationError(StrictDataclassClassValidationError, ValueError):
    """An invalid MimCo config: a `ValueError` naming the field, and the error that `@strict` configs raise."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


def _raise_value_errors(config_class: type[PreTrainedConfig]) -> None:
    """`@strict` wraps the validators' `ValueError`s in an exception that is not a `ValueError`; make `validate`
    raise one that is both, carrying the validator's own message."""
    strict_validate = config_class.validate

    def validate(self) -> None:
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            if isinstance(error, ValueError):
                raise
            cause = error.__cause__
            raise MimCoConfigValidationError(str(cause) if cause is not None else str(error)) from cause

    validate.__is_defined_by_strict_decorator__ = True
    config_class.validate = validate


_raise_value_errors(MimCoConfig)
_raise_value_errors(MimCoContrastiveConfig)


# Backbone shapes selectable with --model_preset; "tiny" is for the demo and tests on 32-px images.
MODEL_PRESETS = {
    "tiny": dict(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
    ),
    # the demo's width and depth on 64-px scenes with 8-px patches: as many tokens as "tiny" at 32 px, so it costs the
    # same per image (the dense-transfer study's digit canvases)
    "tiny-64": dict(
        image_size=64,
        patch_size=8,
        mask_patch_size=16,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
    ),
    "vit-small-patch16": dict(
        image_size=224,
        patch_size=16,
        mask_patch_size=32,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
    ),
    "vit-base-patch16": dict(
        image_size=224,
        patch_size=16,
        mask_patch_size=32,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    ),
}


# The `MimCoConfig` fields that make up a backbone's shape (what a preset sets).
BACKBONE_FIELDS = tuple(MODEL_PRESETS["tiny"])


def preset_backbone_kwargs(model_preset: str, image_size: int | None = None) -> dict:
    """The `MimCoConfig` backbone fields of a preset, optionally at another image size."""
    if model_preset not in MODEL_PRESETS:
        raise ValueError(f"--model_preset must be one of {sorted(MODEL_PRESETS)}, got {model_preset!r}.")
    kwargs = dict(MODEL_PRESETS[model_preset])
    if image_size is not None:
        kwargs["image_size"] = image_size
    return kwargs


# Marked for remote code where the class is defined, so that every `save_pretrained` writes the `auto_map` and copies
# the model files, however the class was imported (the package's Auto-class registration is separate, and lazy).
MimCoConfig.register_for_auto_class()
MimCoContrastiveConfig.register_for_auto_class()
MimCoUperNetConfig.register_for_auto_class()


__all__ = [
    "BACKBONE_FIELDS",
    "MODEL_PRESETS",
    "MimCoConfig",
    "MimCoContrastiveConfig",
    "MimCoUperNetConfig",
    "check_feature_pyramid",
    "preset_backbone_kwargs",
]
