"""Records what `save_pretrained` writes for each MimCo model class at the tiny test shape: the file names, the
`config.json` and every weight's name, shape and dtype. `tests/test_folder_layout.py` rebuilds such folders from the
record and loads them with today's code, so that a checkpoint written by an earlier release keeps loading.

The committed record was written by the package as it stood before the code was reorganised into its current files
(commit e0b733f), from a checkout of that commit:

    PYTHONPATH=<checkout of e0b733f> python tests/helpers/record_folder_layout.py --output tests/fixtures/folder_layout_e0b733f.json

Only the tiny shape of `tests/conftest.py` is recorded; values are not (the test writes seeded random weights).
"""

import argparse
import json
import os
import sys
import tempfile

from safetensors import safe_open


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import TINY_MIMCO_VALUES  # noqa: E402 (after the path)


def tiny_models() -> dict:
    """One tiny model of each class a MimCo folder can hold, keyed by class name."""
    import torch

    from modeling_mimco import (
        MimCoConfig,
        MimCoContrastiveConfig,
        MimCoForContrastivePreTraining,
        MimCoForImageClassification,
        MimCoForPreTraining,
        MimCoModel,
    )

    torch.manual_seed(0)
    config = MimCoConfig(**TINY_MIMCO_VALUES)
    classifier_config = MimCoConfig(**TINY_MIMCO_VALUES, num_labels=3)
    contrastive_config = MimCoContrastiveConfig(
        backbone_config=MimCoConfig(**TINY_MIMCO_VALUES), projector_hidden_size=32, projection_size=16
    )
    return {
        "MimCoModel": MimCoModel(config),
        "MimCoForPreTraining": MimCoForPreTraining(config),
        "MimCoForImageClassification": MimCoForImageClassification(classifier_config),
        "MimCoForContrastivePreTraining": MimCoForContrastivePreTraining(contrastive_config),
    }


def record(model) -> dict:
    """What `model.save_pretrained` writes: file names, config and weight layout."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        files = sorted(os.listdir(folder))
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
        weights = {}
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as weights_file:
            for name in sorted(weights_file.keys()):
                tensor = weights_file.get_slice(name)
                weights[name] = {"shape": list(tensor.get_shape()), "dtype": tensor.get_dtype()}
    config.pop("transformers_version", None)
    return {"files": files, "config": config, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    layout = {name: record(model) for name, model in tiny_models().items()}
    with open(args.output, "w") as handle:
        json.dump(layout, handle, indent=1, sort_keys=True)
        handle.write("\n")
    print(f"wrote {args.output}: " + ", ".join(f"{k} ({len(v['weights'])} weights)" for k, v in layout.items()))


if __name__ == "__main__":
    main()
