"""Every folder the package writes loads where the package is not installed, and serves transformers' pipelines.

The folders are made by the code that makes them for a user: `save_pretrained` of stage 1, stage 2, the classifier
and the backbone, `mimco-segment`, a `checkpoint-N` folder of `mimco-finetune`, and what `mimco-push` uploads (to a
local fake Hub). One process in a virtual environment with transformers but without `modeling_mimco`
(`clean_venv_python`) loads them all with `trust_remote_code=True` through the Auto class a user would pick, and
runs the pipelines on them; its outputs must equal this process's to 1e-6.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.clean_process import run_without_package
from helpers.fake_hub import FakeHub, use_in_process
from helpers.scripts import load_script

from modeling_mimco import (
    MimCoBackbone,
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoForSemanticSegmentation,
)


pytestmark = pytest.mark.usefixtures("one_thread")

FAKE_TOKEN = "hf_" + "Ld9" * 12
# distinctive normalisation and size: the saved processor must carry the model's own, not a default
PIXELS = dict(image_size=32, image_mean=[0.45, 0.5, 0.55], image_std=[0.2, 0.25, 0.3])
TINY = dict(
    patch_size=4,
    mask_patch_size=8,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    head_hidden_size=16,
    **PIXELS,
)
LABELS = ["cat", "dog", "bird"]
TOLERANCE = 1e-6


def model_outputs(kind: str, model, inputs: dict) -> dict:
    """The outputs compared for a folder of `kind`, as tensors; the same function runs in the clean process."""
    pixel_values = inputs["pixel_values"]
    if kind == "contrastive":
        output = model(pixel_values_1=pixel_values, pixel_values_2=inputs["pixel_values_2"])
        return {"loss": output.loss, "query": output.queries[0], "key": output.momentum_keys[1]}
    if kind == "pretraining":
        output = model(pixel_values, bool_masked_pos=inputs["bool_masked_pos"])
        return {"loss": output.loss, "patch_predictions": output.patch_predictions}
    if kind == "features":
        output = model(pixel_values)
        return {"last_hidden_state": output.last_hidden_state, "pooler_output": output.pooler_output}
    if kind == "classifier":
        return {"logits": model(pixel_values).logits}
    if kind == "backbone":
        return {f"map{index}": feature_map for index, feature_map in enumerate(model(pixel_values).feature_maps)}
    if kind == "segmentation":
        return {"logits": model(pixel_values).logits}
    raise ValueError(kind)


CHILD_SCRIPT = (
    textwrap.dedent(
        """
        import json

        import numpy as np
        import PIL.Image
        import torch
        from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
        from transformers import (
            AutoBackbone,
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            AutoModelForImageClassification,
            AutoModelForPreTraining,
            AutoModelForSemanticSegmentation,
            pipeline,
        )
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        AUTO_CLASSES = {
            "AutoModel": AutoModel,
            "AutoModelForPreTraining": AutoModelForPreTraining,
            "AutoModelForImageClassification": AutoModelForImageClassification,
            "AutoModelForSemanticSegmentation": AutoModelForSemanticSegmentation,
        }


        def load(auto_class, folder):
            if auto_class != "AutoBackbone":
                return AUTO_CLASSES[auto_class].from_pretrained(folder, trust_remote_code=True), auto_class
            try:
                return AutoBackbone.from_pretrained(folder, trust_remote_code=True), auto_class
            except (HFValidationError, OfflineModeIsEnabled):
                # transformers 5.25's AutoBackbone asks the Hub about every path, a local folder too; the class the
                # folder's `auto_map` names for AutoBackbone, from the folder's own code, is what it would load
                config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
                backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], folder)
                return backbone_class.from_pretrained(folder), "auto_map['AutoBackbone']"
        """
    )
    + "\n\n"
    + textwrap.dedent(inspect.getsource(model_outputs))
    + textwrap.dedent(
        """

        def run_pipelines(spec, trust_remote_code):
            images = [PIL.Image.open(path).convert("RGB") for path in spec["images"]]
            kwargs = {"trust_remote_code": True} if trust_remote_code else {}
            classify = pipeline("image-classification", model=spec["classifier"], **kwargs)
            extract = pipeline("image-feature-extraction", model=spec["features"], **kwargs)
            pooled = pipeline("image-feature-extraction", model=spec["features"], pool=True, **kwargs)
            segment = pipeline("image-segmentation", model=spec["segmentation"], **kwargs)
            return {
                "classes": [type(p.model).__name__ for p in (classify, extract, segment)],
                "processors": [type(p.image_processor).__name__ for p in (classify, extract, segment)],
                "classification": classify(images, top_k=3),
                "features": extract(images),
                "pooled": pooled(images),
                "segmentation": [
                    [{"label": s["label"], "mask": np.asarray(s["mask"]).tolist()} for s in result]
                    for result in segment(images)
                ],
            }


        if __name__ == "__main__":
            spec = json.load(open(sys.argv[1]))
            inputs = torch.load(spec["inputs"], weights_only=True)
            results = {"loads": {}, "processors": {}}
            for name, item in spec["loads"].items():
                model, route = load(item["auto_class"], item["folder"])
                with torch.no_grad():
                    outputs = model_outputs(item["kind"], model.eval(), inputs)
                results["loads"][name] = {
                    "class": type(model).__name__,
                    "module": type(model).__module__,
                    "route": route,
                    "outputs": outputs,
                }
                processor = AutoImageProcessor.from_pretrained(item["folder"])
                results["processors"][name] = [type(processor).__name__, processor.image_mean, processor.image_std]
            results["pipelines"] = run_pipelines(spec["pipelines"], trust_remote_code=True)
            torch.save(results, sys.argv[2])
        """
    )
)


def _namespace() -> dict:
    """The clean process's functions, for this process: `run_pipelines` runs here as it runs there."""
    namespace = {"__name__": "load_anywhere_child", "sys": __import__("sys")}
    exec(compile(CHILD_SCRIPT, "<clean process script>", "exec"), namespace)
    return namespace


def _tiny_config(**overrides) -> MimCoConfig:
    return MimCoConfig(**{**TINY, **overrides})


def _write_images(folder: Path) -> list[str]:
    """Three noise images of sizes other than the model's: the processors must resize them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(40, 36), (32, 32), (27, 50)]):
        path = folder / f"image{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _segment(root: Path, checkpoint: Path) -> Path:
    """`mimco-segment` with tiny steps on the synthetic canvases; returns its output folder."""
    output_dir = root / "segmenter"
    load_script("run_semantic_segmentation").main(
        ["--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir)]
        + ["--synthetic_canvas_size", "32", "--synthetic_train_images", "8", "--synthetic_eval_images", "4"]
        + ["--crop_size", "32", "--decoder_hidden_size", "16", "--max_steps", "1", "--warmup_steps", "0"]
        + ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--save_strategy", "no"]
        + ["--eval_strategy", "no", "--do_eval", "false", "--report_to", "none", "--use_cpu"]
        + ["--dataloader_pin_memory", "false", "--seed", "0"]
    )
    return output_dir


def _finetune_checkpoint(root: Path, checkpoint: Path) -> Path:
    """`mimco-finetune` for one step on the built-in digits, saving a Trainer checkpoint; returns `checkpoint-1`."""
    output_dir = root / "finetuned"
    load_script("run_finetuning").main(
        ["--model_name_or_path", str(checkpoint), "--dataset_name", "digits", "--output_dir", str(output_dir)]
        + ["--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "steps"]
        + ["--save_steps", "1", "--eval_strategy", "no", "--do_eval", "false", "--report_to", "none"]
        + ["--use_cpu", "--dataloader_pin_memory", "false", "--seed", "0"]
    )
    return output_dir / "checkpoint-1"


def _push(folders: dict[str, Path], root: Path) -> dict[str, Path]:
    """Uploads each folder with `mimco-push` to a local fake Hub; returns, for each, a folder holding exactly what
    the Hub received."""
    pushed = {}
    with pytest.MonkeyPatch.context() as monkeypatch, FakeHub(token=FAKE_TOKEN, timeout_s=120) as fake:
        use_in_process(fake, monkeypatch, token=FAKE_TOKEN)
        for name, folder in folders.items():
            load_script("push_to_hub").main(["--checkpoint_dir", str(folder), "--hub_model_id", f"me/{name}"])
        assert fake.unexpected == [] and len(fake.commits) == len(folders)
        for name, commit in zip(folders, fake.commits):
            target = root / "pushed" / name
            target.mkdir(parents=True)
            for path, content in commit.files.items():
                (target / path).write_bytes(content)
            pushed[name] = target
    return pushed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every kind of folder, made by the code that makes it, with this process's outputs on fixed inputs."""
    root = tmp_path_factory.mktemp("load-anywhere")
    torch.manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "pixel_values_2": torch.randn(2, 3, 32, 32),
    }
    stage1 = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(
            backbone_config=_tiny_config(position_embedding_type="sincos"), projector_hidden_size=16, projection_size=8
        )
    ).eval()
    stage2 = MimCoForPreTraining(_tiny_config()).eval()
    inputs["bool_masked_pos"] = stage2.mask_generator.batch(2)
    classifier = MimCoForImageClassification(
        _tiny_config(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    ).eval()
    for name, model in [("stage1", stage1), ("stage2", stage2), ("classifier", classifier)]:
        model.save_pretrained(root / name)
    backbone = MimCoBackbone.from_pretrained(
        root / "stage2", out_features=["stage1", "stage2", "stage3", "stage4"], use_feature_pyramid=True
    ).eval()
    backbone.save_pretrained(root / "backbone")

    segmenter = _segment(root, root / "stage2")
    finetuned = _finetune_checkpoint(root, root / "classifier")
    pushed = _push({"stage1": root / "stage1", "classifier": root / "classifier", "segmenter": segmenter}, root)

    # where the package is installed, the segmentation folder is transformers' UperNet, the checkpoint a classifier
    from transformers import UperNetForSemanticSegmentation

    upernet = UperNetForSemanticSegmentation.from_pretrained(segmenter).eval()
    checkpoint_model = MimCoForImageClassification.from_pretrained(finetuned).eval()

    loads = {
        # name: (folder, Auto class, kind of outputs, model of this process)
        "stage1": (root / "stage1", "AutoModelForPreTraining", "contrastive", stage1),
        "stage2": (root / "stage2", "AutoModelForPreTraining", "pretraining", stage2),
        "stage2-encoder": (root / "stage2", "AutoModel", "features", stage2.mimco),
        "classifier": (root / "classifier", "AutoModelForImageClassification", "classifier", classifier),
        "backbone": (root / "backbone", "AutoBackbone", "backbone", backbone),
        "segmenter": (segmenter, "AutoModelForSemanticSegmentation", "segmentation", upernet),
        "finetune-checkpoint": (finetuned, "AutoModelForImageClassification", "classifier", checkpoint_model),
        "pushed-stage1": (pushed["stage1"], "AutoModelForPreTraining", "contrastive", stage1),
        "pushed-classifier": (pushed["classifier"], "AutoModelForImageClassification", "classifier", classifier),
        "pushed-segmenter": (pushed["segmenter"], "AutoModelForSemanticSegmentation", "segmentation", upernet),
    }
    expected = {}
    with torch.no_grad():
        for name, (_, _, kind, model) in loads.items():
            expected[name] = model_outputs(kind, model, inputs)
    torch.save(inputs, root / "inputs.pt")
    spec = {
        "inputs": str(root / "inputs.pt"),
        "loads": {
            name: {"folder": str(folder), "auto_class": auto_class, "kind": kind}
            for name, (folder, auto_class, kind, _) in loads.items()
        },
        "pipelines": {
            "images": _write_images(root / "images"),
            "classifier": str(root / "classifier"),
            "features": str(root / "stage2"),
            "segmentation": str(segmenter),
        },
    }
    (root / "spec.json").write_text(json.dumps(spec))
    return root, spec, expected, {name: model for name, (_, _, _, model) in loads.items()}


@pytest.mark.slow
def test_every_folder_carries_its_code_and_its_image_processor(saved):
    root, spec, _, models = saved
    expected_auto_maps = {
        "stage1": {"AutoConfig", "AutoModelForPreTraining"},
        "stage2": {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification"},
        "segmenter": {"AutoConfig", "AutoModelForSemanticSegmentation"},
    }
    for name, item in spec["loads"].items():
        folder = Path(item["folder"])
        config = json.loads((folder / "config.json").read_text())
        auto_map = config["auto_map"]
        assert item["auto_class"] in auto_map, (name, auto_map)
        assert expected_auto_maps.get(name.removeprefix("pushed-"), set()) <= set(auto_map), (name, auto_map)
        for reference in auto_map.values():
            assert (folder / (reference.rsplit(".", 1)[0] + ".py")).is_file(), (name, reference)
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["image_mean"] == PIXELS["image_mean"] and processor["image_std"] == PIXELS["image_std"]
        assert processor["size"] == {"height": 32, "width": 32}, name
        kind = "SegformerImageProcessor" if item["kind"] == "segmentation" else "ViTImageProcessor"
        assert processor["image_processor_type"] == kind, name
    segmenter = json.loads((Path(spec["loads"]["segmenter"]["folder"]) / "config.json").read_text())
    assert segmenter["model_type"] == "upernet" and segmenter["backbone_config"]["model_type"] == "mimco"
    assert segmenter["architectures"] == ["MimCoForSemanticSegmentation"]
    assert type(models["segmenter"]).__name__ == "UperNetForSemanticSegmentation"


@pytest.mark.slow
def test_every_folder_loads_without_the_package_with_the_same_outputs(saved, clean_venv_python, tmp_path):
    root, spec, expected, _ = saved
    result = run_without_package(
        CHILD_SCRIPT, [root / "spec.json", tmp_path / "results.pt"], tmp_path, python=clean_venv_python
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)

    classes = {
        "stage1": "MimCoForContrastivePreTraining",
        "stage2": "MimCoForPreTraining",
        "stage2-encoder": "MimCoModel",
        "classifier": "MimCoForImageClassification",
        "backbone": "MimCoBackbone",
        "segmenter": "MimCoForSemanticSegmentation",
        "finetune-checkpoint": "MimCoForImageClassification",
    }
    largest = 0.0
    for name, loaded in results["loads"].items():
        assert loaded["class"] == classes[name.removeprefix("pushed-")], name
        assert loaded["module"].startswith("transformers_modules."), name
        # transformers 5.25's AutoBackbone cannot read a local folder (see the README); the others go through theirs
        routes = ("AutoBackbone", "auto_map['AutoBackbone']")
        assert loaded["route"] in (routes if name == "backbone" else (spec["loads"][name]["auto_class"],)), name
        assert loaded["outputs"].keys() == expected[name].keys(), name
        for key, wanted in expected[name].items():
            actual = loaded["outputs"][key]
            assert actual.shape == wanted.shape, (name, key)
            difference = (actual - wanted).abs().max().item()
            largest = max(largest, difference)
            assert difference <= TOLERANCE, (name, key, difference)
        processor_class, mean, std = results["processors"][name]
        assert (
            processor_class in ("ViTImageProcessor", "SegformerImageProcessor") and list(mean) == PIXELS["image_mean"]
        )
        assert list(std) == PIXELS["image_std"], name
    assert set(results["loads"]) == set(expected)
    print(f"largest difference between the clean process and this one: {largest:.3g}")

    # the pipelines on the same folders, here (the package's registered classes) and there (the folders' code)
    here = _namespace()["run_pipelines"](spec["pipelines"], trust_remote_code=False)
    there = results["pipelines"]
    assert here["classes"] == ["MimCoForImageClassification", "MimCoModel", "UperNetForSemanticSegmentation"]
    assert there["classes"] == ["MimCoForImageClassification", "MimCoModel", "MimCoForSemanticSegmentation"]
    assert (
        here["processors"]
        == there["processors"]
        == ["ViTImageProcessor", "ViTImageProcessor", "SegformerImageProcessor"]
    )
    for ours, theirs in zip(here["classification"], there["classification"]):
        assert [p["label"] for p in ours] == [p["label"] for p in theirs] and {p["label"] for p in ours} == set(LABELS)
        np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=TOLERANCE)
    for key, width in (("features", 1 + 64), ("pooled", None)):
        ours, theirs = np.array(here[key], dtype=np.float64), np.array(there[key], dtype=np.float64)
        assert ours.shape == ((3, 1, width, 32) if width else (3, 1, 32)), (key, ours.shape)
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)
    assert here["segmentation"] == there["segmentation"]
    assert all(result and {s["label"] for s in result} for result in here["segmentation"])


# --- the image processor where the package is installed ----------------------------------------------------------------


def test_auto_image_processor_resolves_for_mimco_model_types(tmp_path):
    """A MimCo folder whose processor file names no class (an older or hand-written one) still gets transformers' ViT
    processor: `AutoImageProcessor` knows `model_type` "mimco" and "mimco_contrastive"."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    stage1 = MimCoForContrastivePreTraining(
        MimCoContrastiveConfig(backbone_config=_tiny_config(), projector_hidden_size=16, projection_size=8)
    )
    for name, model in [("stage2", MimCoForPreTraining(_tiny_config())), ("stage1", stage1)]:
        model.save_pretrained(tmp_path / name)
        processor_file = tmp_path / name / "preprocessor_config.json"
        processor = json.loads(processor_file.read_text())
        processor_file.write_text(json.dumps({k: v for k, v in processor.items() if k != "image_processor_type"}))
        loaded = AutoImageProcessor.from_pretrained(tmp_path / name)
        assert isinstance(loaded, ViTImageProcessor), (name, type(loaded))
        assert list(loaded.image_mean) == PIXELS["image_mean"] and list(loaded.image_std) == PIXELS["image_std"]


def test_a_processor_already_in_the_folder_is_kept(tmp_path):
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path
    )
    MimCoForImageClassification(_tiny_config(num_labels=2)).save_pretrained(tmp_path)
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 48, "width": 48} and processor["image_mean"] == [0.5] * 3


def test_a_plain_segmentation_folder_serves_the_segmentation_pipeline(tmp_path):
    """`MimCoForSemanticSegmentation` from the Auto class, saved as is: `UperNetForSemanticSegmentation` reads the
    folder with the same logits, and the pipeline runs on it."""
    from transformers import AutoModelForSemanticSegmentation, UperNetForSemanticSegmentation, pipeline

    from modeling_mimco import MimCoUperNetConfig

    backbone = _tiny_config(out_indices=[1, 2, 3, 4], use_feature_pyramid=True)
    config = MimCoUperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_channels=8, num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSemanticSegmentation.from_config(config).eval()
    assert isinstance(model, MimCoForSemanticSegmentation)
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()(pixel_values).logits,
            model(pixel_values).logits,
            rtol=0,
            atol=0,
        )
    segment = pipeline("image-segmentation", model=str(tmp_path))
    results = segment(PIL.Image.fromarray(np.full((40, 36, 3), 128, dtype=np.uint8)))
    assert results and all(np.asarray(result["mask"]).shape == (40, 36) for result in results)


def test_push_to_hub_uploads_the_image_processor(tmp_path, monkeypatch):
    """`push_to_hub` and `save_pretrained(push_to_hub=True)` upload `preprocessor_config.json` with the model (to a
    local fake Hub; transformers' own model card, which it would fetch from the Hub, is replaced)."""
    from huggingface_hub import ModelCard
    from transformers import modeling_utils
    from transformers.utils import hub

    def local_card(repo_id, tags=None, token=None):
        return ModelCard(f"---\nlibrary_name: transformers\n---\n# {repo_id}\n")

    monkeypatch.setattr(hub, "create_and_tag_model_card", local_card)
    monkeypatch.setattr(modeling_utils, "create_and_tag_model_card", local_card)
    model = MimCoForPreTraining(_tiny_config(num_hidden_layers=1))
    with FakeHub(token=FAKE_TOKEN, timeout_s=60) as fake:
        use_in_process(fake, monkeypatch, token=FAKE_TOKEN)
        model.push_to_hub("me/pushed", token=FAKE_TOKEN)
        model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved", token=FAKE_TOKEN)
    assert fake.unexpected == []
    received = {}
    for commit in fake.commits:
        received.setdefault(commit.repo_id, {}).update(commit.files)
    for repo_id in ("me/pushed", "me/saved"):
        assert {"config.json", "model.safetensors", "modeling_mimco.py"} <= set(received[repo_id]), repo_id
        processor = json.loads(received[repo_id]["preprocessor_config.json"])
        assert processor["image_mean"] == PIXELS["image_mean"] and processor["image_std"] == PIXELS["image_std"]


def test_the_saved_processor_is_the_one_the_commands_write(tmp_path):
    """`save_pretrained`'s processor equals `interop.model_folders.save_image_processor`'s for the model's config."""
    from modeling_mimco.interop.model_folders import save_image_processor

    MimCoForImageClassification(_tiny_config(num_labels=2)).save_pretrained(tmp_path / "model")
    save_image_processor(tmp_path / "command", PIXELS["image_size"], PIXELS["image_mean"], PIXELS["image_std"])
    saved = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    assert saved == json.loads((tmp_path / "command" / "preprocessor_config.json").read_text())
