"""How the frozen teacher is fed and read: pixel re-normalisation, grid matching and token splitting.

The teacher may be any Hugging Face ViT-like backbone whose `last_hidden_state` is `[CLS, (register tokens),
patch tokens]`: a `MimCoModel` (a converted MoCo v3 checkpoint, or this package's stage 1), a `ViTModel` (DINO)
or a `Dinov2Model` (patch 14, with or without registers).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig


# Backbones that resample their position embeddings for any input size on every call, without a flag.
ALWAYS_INTERPOLATING_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")


def teacher_num_prefix_tokens(teacher_config: PreTrainedConfig) -> int:
    """Tokens before the patch tokens in the teacher's output: the CLS token plus any register tokens."""
    return 1 + int(getattr(teacher_config, "num_register_tokens", 0) or 0)


def _as_int(size) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"Only square teacher images and patches are supported, got {size}.")
        return int(size[0])
    return int(size)


class TeacherInputAdapter(nn.Module):
    """Turns the student's `pixel_values` into the teacher's input and the teacher's output into MimCo targets.

    The student's pixels are normalised with the student's mean/std; the teacher's with its own. When the teacher's
    patch size differs from the student's, the image is resized so that the teacher sees exactly the student's
    patch grid (a 224-px ViT/16 student and a DINOv2/14 teacher: the teacher gets 196 px). The teacher's position
    embeddings are interpolated when its input size differs from its configured `image_size`.

    Raises `ValueError` at construction when the two grids cannot be matched: a teacher without patches, or one
    that cannot take another input size when the grids differ.
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_config: PreTrainedConfig,
        student_grid_size: int,
        student_mean: list[float],
        student_std: list[float],
        teacher_mean: list[float],
        teacher_std: list[float],
    ):
        super().__init__()
        patch_size = getattr(teacher_config, "patch_size", None)
        if patch_size is None:
            raise ValueError(
                f"The teacher ({type(teacher_config).__name__}) has no `patch_size`: it must be a ViT-like backbone."
            )
        self.teacher_patch_size = _as_int(patch_size)
        self.student_grid_size = student_grid_size
        self.teacher_input_size = student_grid_size * self.teacher_patch_size
        self.num_prefix_tokens = teacher_num_prefix_tokens(teacher_config)

        configured_size = _as_int(getattr(teacher_config, "image_size", self.teacher_input_size))
        accepts_flag = "interpolate_pos_encoding" in inspect.signature(teacher.forward).parameters
        always_interpolates = getattr(teacher_config, "model_type", None) in ALWAYS_INTERPOLATING_MODEL_TYPES
        self.needs_interpolation_flag = configured_size != self.teacher_input_size and accepts_flag
        if configured_size != self.teacher_input_size and not (accepts_flag or always_interpolates):
            teacher_grid = configured_size // self.teacher_patch_size
            raise ValueError(
                f"The teacher's patch grid ({teacher_grid}x{teacher_grid}, image_size {configured_size}, patch_size "
                f"{self.teacher_patch_size}) cannot be matched to the student's ({student_grid_size}x"
                f"{student_grid_size}): {type(teacher).__name__} cannot take other input sizes."
            )

        # Converting the student's normalisation into the teacher's is one affine map per channel. It is kept as
        # plain floats (not buffers) so that building the model on the meta device, as `from_pretrained` does,
        # leaves nothing uninitialised; tensors are made once per device and dtype.
        self.renormalize = list(student_mean) != list(teacher_mean) or list(student_std) != list(teacher_std)
        self.pixel_scale = [s / t for s, t in zip(student_std, teacher_std)]
        self.pixel_shift = [(ms - mt) / t for ms, mt, t in zip(student_mean, teacher_mean, teacher_std)]
        self._affine_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _affine(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (reference.device, reference.dtype)
        if key not in self._affine_cache:
            scale = torch.tensor(self.pixel_scale, device=reference.device, dtype=reference.dtype).view(1, -1, 1, 1)
            shift = torch.tensor(self.pixel_shift, device=reference.device, dtype=reference.dtype).view(1, -1, 1, 1)
            self._affine_cache[key] = (scale, shift)
        return self._affine_cache[key]

    def teacher_inputs(self, pixel_values: torch.Tensor) -> dict:
        """Keyword arguments for the teacher's forward: its `pixel_values` (and the interpolation flag if needed)."""
        if self.renormalize:
            scale, shift = self._affine(pixel_values)
            pixel_values = pixel_values * scale + shift
        if pixel_values.shape[-2:] != (self.teacher_input_size, self.teacher_input_size):
            pixel_values = F.interpolate(
                pixel_values,
                size=(self.teacher_input_size, self.teacher_input_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        inputs = {"pixel_values": pixel_values}
        if self.needs_interpolation_flag:
            inputs["interpolate_pos_encoding"] = True
        return inputs

    def split_tokens(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Splits the teacher's `last_hidden_state` into its CLS token `(batch, dim)` and patch tokens
        `(batch, num_patches, dim)`, skipping register tokens."""
        expected = self.num_prefix_tokens + self.student_grid_size**2
        if last_hidden_state.shape[1] != expected:
            raise ValueError(
                f"The teacher returned {last_hidden_state.shape[1]} tokens, but {self.num_prefix_tokens} prefix "
                f"token(s) and a {self.student_grid_size}x{self.student_grid_size} patch grid ({expected} tokens) "
                "were expected: the teacher's and the student's grids do not match."
            )
        return last_hidden_state[:, 0], last_hidden_state[:, self.num_prefix_tokens :]


__all__ = ["TeacherInputAdapter", "teacher_num_prefix_tokens"]
