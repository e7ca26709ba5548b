"""Shared helpers for the tests: tiny configs that keep every model a few thousand parameters."""

import pytest
from transformers import ViTConfig

from modeling_mimco import MimCoConfig


TINY_MIMCO_VALUES = dict(
    image_size=32,
    patch_size=4,
    mask_patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    head_hidden_size=32,
)


def make_tiny_mimco_config(**overrides) -> MimCoConfig:
    """A 32-px, patch-4 (8x8 grid), 2-layer, width-32 `MimCoConfig`; keyword arguments override any field."""
    return MimCoConfig(**{**TINY_MIMCO_VALUES, **overrides})


def make_tiny_vit_teacher_config(**overrides) -> ViTConfig:
    """A DINO-like `transformers.ViTConfig` at 32 px with patch 4, one layer and width 24."""
    values = dict(
        image_size=32,
        patch_size=4,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
    )
    values.update(overrides)
    return ViTConfig(**values)


@pytest.fixture
def tiny_mimco_config():
    """Factory fixture: `tiny_mimco_config(**overrides)` returns a tiny `MimCoConfig`."""
    return make_tiny_mimco_config


@pytest.fixture
def tiny_vit_teacher_config():
    """Factory fixture: `tiny_vit_teacher_config(**overrides)` returns a tiny `transformers.ViTConfig`."""
    return make_tiny_vit_teacher_config
