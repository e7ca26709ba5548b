"""ONNX export of the MimCo inference models (`MimCoModel`, `MimCoForImageClassification`, `MimCoBackbone`).

`export_onnx(model, path)` writes one `.onnx` file with `torch.onnx.export`'s dynamo exporter (it needs the optional
`onnx` extra: `pip install 'mimco[onnx]'`, which brings onnx, onnxscript and onnxruntime). The graph takes one input,
`pixel_values` `(batch, channels, height, width)`, with a dynamic batch size; with `dynamic_image_size=True` the height
and width are dynamic too (any multiple of `patch_size`), the position table being resampled in the graph as MimCo's
`interpolate_pos_encoding` does (bicubic with antialiasing: ONNX `Resize`, opset 18). Its outputs are named:

* `MimCoModel`: `last_hidden_state` `(batch, 1 + num_patches, hidden_size)` and `pooler_output` `(batch,
  hidden_size)` (only `last_hidden_state` for a model built with `add_pooling_layer=False`);
* `MimCoForImageClassification`: `logits` `(batch, num_labels)`;
* `MimCoBackbone`: one `feature_map_{stage}` per `out_features` stage (`feature_map_stage12`...).

`MimCoForPreTraining` is not exported: its student is `model.mimco`, a `MimCoModel`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modeling_mimco.modeling_mimco import MimCoBackbone, MimCoForImageClassification, MimCoModel


# the opset of ONNX `Resize` with antialiasing, which the in-graph resampling of the position table needs
ONNX_OPSET = 18


class _OnnxOutputs(nn.Module):
    """A MimCo model whose forward takes `pixel_values` alone and returns its outputs as a tuple of tensors, in the
    order of `output_names`."""

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool):
        super().__init__()
        self.model = model
        self.interpolate_pos_encoding = interpolate_pos_encoding
        if isinstance(model, MimCoBackbone):
            self.output_names = [f"feature_map_{stage}" for stage in model.out_features]
        elif isinstance(model, MimCoForImageClassification):
            self.output_names = ["logits"]
        elif model.add_pooling_layer:
            self.output_names = ["last_hidden_state", "pooler_output"]
        else:
            self.output_names = ["last_hidden_state"]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if isinstance(self.model, MimCoBackbone):
            # a backbone always resamples its positions to the input's grid
            return tuple(self.model(pixel_values).feature_maps)
        outputs = self.model(pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)
        if isinstance(self.model, MimCoForImageClassification):
            return (outputs.logits,)
        return tuple(getattr(outputs, name) for name in self.output_names)


def onnx_output_names(model: nn.Module) -> list[str]:
    """The names of the outputs that `export_onnx` gives `model`'s graph."""
    return list(_OnnxOutputs(model, False).output_names)


def _weight_bytes(model: nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in (*model.parameters(), *model.buffers()))


def export_onnx(
    model: MimCoModel | MimCoForImageClassification | MimCoBackbone,
    output_path: str | Path,
    dynamic_image_size: bool = False,
    opset_version: int = ONNX_OPSET,
) -> Path:
    """Writes `model` (in eval mode) as an ONNX file at `output_path`; returns the path.

    Args:
        model: A `MimCoModel`, `MimCoForImageClassification` or `MimCoBackbone` (any attention kernel: the eager or
            SDPA product is what is traced).
        output_path: The `.onnx` file to write (its folder is created).
        dynamic_image_size: Also make height and width dynamic (multiples of `patch_size`): the graph then resamples
            the position table to the input's patch grid, as `interpolate_pos_encoding=True` does (the identity at
            `image_size`). Without it, the graph takes `image_size` x `image_size` images only (a backbone resamples
            to its input's grid either way, so its graph follows the same rule).
        opset_version: The ONNX opset (18 or later: antialiased `Resize`).

    The batch size is always dynamic. The traced example is a batch of 2 at a size other than `image_size` when
    the size is dynamic, so that the resampling, which is skipped on the trained grid, is in the graph.
    """
    if not isinstance(model, (MimCoModel, MimCoForImageClassification, MimCoBackbone)):
        raise ValueError(
            f"export_onnx takes a MimCoModel, MimCoForImageClassification or MimCoBackbone, not "
            f"{type(model).__name__}; for a MimCoForPreTraining, export its student `model.mimco`."
        )
    config = model.config
    wrapped = _OnnxOutputs(model.eval(), interpolate_pos_encoding=dynamic_image_size).eval()
    patch_size = config.patch_size
    if dynamic_image_size:
        # a height and width that differ from `image_size` and from each other, so that neither is specialised
        height, width = config.image_size + patch_size, config.image_size + 2 * patch_size
    else:
        height = width = config.image_size
    parameter = next(model.parameters())
    example = torch.zeros(2, config.num_channels, height, width, dtype=parameter.dtype, device=parameter.device)

    batch = torch.export.Dim("batch_size")
    dynamic_axes = {0: batch}
    if dynamic_image_size:
        dynamic_axes[2] = patch_size * torch.export.Dim("patch_rows", min=1, max=1024)
        dynamic_axes[3] = patch_size * torch.export.Dim("patch_columns", min=1, max=1024)

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (example,),
            output_path,
            input_names=["pixel_values"],
            output_names=wrapped.output_names,
            dynamic_shapes={"pixel_values": dynamic_axes},
            opset_version=opset_version,
            dynamo=True,
            # one file, unless the weights pass protobuf's 2 GiB limit (then beside it, as `<name>.onnx.data`)
            external_data=_weight_bytes(model) >= 2**31 - 2**26,
            verbose=False,
        )
    return output_path


__all__ = ["ONNX_OPSET", "export_onnx", "onnx_output_names"]
