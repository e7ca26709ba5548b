"""ONNX export (`modeling_mimco.interop.onnx_export`, the optional extra `.[onnx]`): MimCoModel, the classifier and
the backbone, run by onnxruntime, give PyTorch's outputs to 1e-4, at other batch sizes and, where the size is
dynamic, at other image sizes."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from conftest import make_tiny_mimco_config

from modeling_mimco import MimCoBackbone, MimCoForImageClassification, MimCoForPreTraining, MimCoModel


pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")

from modeling_mimco.interop.onnx_export import export_onnx, onnx_output_names  # noqa: E402 (after the skips)


TOLERANCE = 1e-4


def _reference_outputs(model, pixel_values: torch.Tensor, dynamic_image_size: bool) -> list[torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, MimCoBackbone):
            return list(model(pixel_values).feature_maps)
        outputs = model(pixel_values, interpolate_pos_encoding=dynamic_image_size)
    if isinstance(model, MimCoForImageClassification):
        return [outputs.logits]
    return [outputs.last_hidden_state, outputs.pooler_output]


@pytest.mark.parametrize(
    ("model_class", "dynamic_image_size", "input_shapes"),
    [
        (MimCoModel, True, [(1, 32, 32), (3, 24, 40), (2, 48, 16)]),
        (MimCoForImageClassification, True, [(1, 32, 32), (5, 40, 24)]),
        (MimCoForImageClassification, False, [(1, 32, 32), (5, 32, 32)]),
        (MimCoBackbone, True, [(1, 32, 32), (3, 24, 40)]),
    ],
    ids=["model-dynamic-size", "classifier-dynamic-size", "classifier-fixed-size", "backbone-dynamic-size"],
)
def test_onnxruntime_gives_pytorchs_outputs(model_class, dynamic_image_size, input_shapes, tmp_path):
    torch.manual_seed(0)
    config = make_tiny_mimco_config(num_labels=3, out_features=["stage1", "stage2"], attn_implementation="sdpa")
    model = model_class(config).eval()
    path = tmp_path / "model.onnx"
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        export_onnx(model, path, dynamic_image_size=dynamic_image_size)
    export_seconds = time.perf_counter() - started

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == onnx_output_names(model)
    largest = 0.0
    started = time.perf_counter()
    for batch_size, height, width in input_shapes:
        pixel_values = torch.randn(batch_size, 3, height, width)
        actual = session.run(None, {"pixel_values": pixel_values.numpy()})
        expected = _reference_outputs(model, pixel_values, dynamic_image_size)
        assert len(actual) == len(expected)
        for array, tensor in zip(actual, expected):
            assert array.shape == tuple(tensor.shape)
            largest = max(largest, float(abs(torch.from_numpy(array) - tensor).max()))
    run_seconds = time.perf_counter() - started
    print(
        f"\n{model_class.__name__} (dynamic size: {dynamic_image_size}): export {export_seconds:.1f} s, "
        f"{len(input_shapes)} onnxruntime runs {run_seconds:.3f} s, largest difference {largest:.2e}"
    )
    assert largest <= TOLERANCE
    if not dynamic_image_size:
        # a fixed-size graph refuses another size rather than computing something else
        with pytest.raises(Exception, match="dimension"):
            session.run(None, {"pixel_values": torch.randn(1, 3, 40, 40).numpy()})


def test_the_pretraining_model_is_refused_naming_its_student(tmp_path):
    model = MimCoForPreTraining(make_tiny_mimco_config())
    with pytest.raises(ValueError, match="model.mimco"):
        export_onnx(model, tmp_path / "pretraining.onnx")
