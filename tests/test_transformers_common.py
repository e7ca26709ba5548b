"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`) run against every
MimCo class.

The tests come from the source distribution of the installed transformers release: `make install` fetches them
with `tests/helpers/fetch_transformers_tests.py` into `.venv/transformers-tests/` (or `$MIMCO_TRANSFORMERS_TESTS`).
Without them this module skips and says what is missing.

The testers follow transformers' `tests/models/vit/test_modeling_vit.py`: a `...ModelTester` builds a tiny config
and inputs, and a `unittest.TestCase` mixes in `ModelTesterMixin` with `all_model_classes` and a `ConfigTester`;
`MimCoBackbone` also gets `BackboneTesterMixin` (`tests/test_backbone_common.py`), as DINOv2's and BEiT's backbones.
Every skip here is one that transformers' ViT or DINOv2 tests make too, or one of a test that does not apply to a
vision backbone; each says why.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from helpers.fetch_transformers_tests import ENTRY_MODULES
from transformers import ViTConfig

from modeling_mimco import (
    MimCoBackbone,
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)


TRANSFORMERS_TESTS_DIR = Path(
    os.environ.get("MIMCO_TRANSFORMERS_TESTS", Path(__file__).resolve().parents[1] / ".venv" / "transformers-tests")
)
FETCH_HINT = "run `python tests/helpers/fetch_transformers_tests.py` (part of `make install`) with network access"


def _fetched_sources() -> dict:
    """What the fetch helper wrote, after checking that it matches the installed transformers; skips otherwise."""
    sources_file = TRANSFORMERS_TESTS_DIR / "SOURCES.json"
    if not sources_file.is_file():
        pytest.skip(
            f"transformers' common tests (tests/{{{','.join(ENTRY_MODULES)}}}.py of the "
            f"transformers {transformers.__version__} sdist) are missing: no {sources_file}; {FETCH_HINT}.",
            allow_module_level=True,
        )
    sources = json.loads(sources_file.read_text())
    if sources.get("transformers_version") != transformers.__version__:
        pytest.skip(
            f"{TRANSFORMERS_TESTS_DIR} holds the common tests of transformers {sources.get('transformers_version')}, "
            f"but transformers {transformers.__version__} is installed; {FETCH_HINT}.",
            allow_module_level=True,
        )
    missing_entries = [name for name in ENTRY_MODULES if name not in sources.get("from_sdist", [])]
    if missing_entries:
        pytest.skip(
            f"{TRANSFORMERS_TESTS_DIR} was fetched before the helper also took {missing_entries}; {FETCH_HINT}.",
            allow_module_level=True,
        )
    if sources.get("missing"):
        pytest.skip(
            f"the transformers {transformers.__version__} sdist lacks modules that its common tests import: "
            f"{sources['missing']}.",
            allow_module_level=True,
        )
    return sources


FETCHED_SOURCES = _fetched_sources()
sys.path.insert(0, str(TRANSFORMERS_TESTS_DIR))
try:
    with warnings.catch_warnings():
        # their marks (`flash_attn_test`...) are registered by transformers' own conftest, which we do not use
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        from transformers.models.auto import modeling_auto
        from transformers.testing_utils import torch_device
        from transformers_tests.test_backbone_common import BackboneTesterMixin
        from transformers_tests.test_configuration_common import ConfigTester
        from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
except ImportError as error:
    pytest.skip(
        f"transformers' common tests cannot be imported: {error} (a test-only requirement of theirs, e.g. "
        "`parameterized`, may be missing).",
        allow_module_level=True,
    )
finally:
    sys.path.remove(str(TRANSFORMERS_TESTS_DIR))


# The common tests recognise a model's task by its class name in transformers' own static name tables (a base
# model has no loss, a classifier gets `labels`...). An in-tree model is listed there; ours are, for each test.
TASK_NAME_TABLES = {
    "MODEL_MAPPING_NAMES": {"mimco": "MimCoModel"},
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": {"mimco": "MimCoForImageClassification"},
    "MODEL_FOR_PRETRAINING_MAPPING_NAMES": {
        "mimco": "MimCoForPreTraining",
        "mimco_contrastive": "MimCoForContrastivePreTraining",
    },
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": {"mimco": "MimCoBackbone"},
}


def assert_export_matches_eager(test: unittest.TestCase, model: torch.nn.Module, inputs: dict) -> None:
    """`torch.export` of `model` in eval mode gives its eager outputs (transformers' `ExportTesterMixin` is not in
    the sdist; this is our own check)."""
    model = model.to(torch_device).eval()
    with torch.no_grad():
        expected = model(**inputs)
        exported = torch.export.export(model, args=(), kwargs=inputs)
        actual = exported.module()(**inputs)
    test.assertEqual(list(actual.keys()), list(expected.keys()))
    for name in expected.keys():
        torch.testing.assert_close(actual[name], expected[name], msg=name)


class _RegisteredInNameTables:
    """Lists the MimCo classes in transformers' task name tables for the duration of each test."""

    def setUp(self):
        super().setUp()
        for table, entries in TASK_NAME_TABLES.items():
            patcher = mock.patch.dict(getattr(modeling_auto, table), entries)
            patcher.start()
            self.addCleanup(patcher.stop)


def tiny_vit_teacher_config() -> ViTConfig:
    """A DINO-like `ViTConfig` teacher on `MimCoModelTester`'s 16-px, patch-4 grid."""
    return ViTConfig(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )


class MimCoModelTester:
    """A tiny `MimCoConfig` (16 px, patch 4: a 4x4 grid, two layers of width 32) and random `pixel_values`."""

    def __init__(
        self,
        parent,
        batch_size=4,
        image_size=16,
        patch_size=4,
        mask_patch_size=8,
        num_channels=3,
        is_training=True,
        use_labels=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        head_hidden_size=16,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        type_sequence_label_size=10,
        initializer_range=0.02,
        mask_ratio=0.5,
        attn_implementation="eager",
        teacher_config=None,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.mask_patch_size = mask_patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.head_hidden_size = head_hidden_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.mask_ratio = mask_ratio
        self.attn_implementation = attn_implementation
        self.teacher_config = teacher_config  # None: MimCoForPreTraining's default, the student's own shape

        # the sequence is the CLS token and one token per patch; masks cover patches only
        num_patches = (image_size // patch_size) ** 2
        self.seq_length = num_patches + 1
        self.num_masks = int(mask_ratio * num_patches)
        self.mask_length = num_patches

    def get_config(self, **extra_fields) -> MimCoConfig:
        """The tiny config; `extra_fields` are further `MimCoConfig` fields (the backbone's `out_features`...)."""
        return MimCoConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            mask_patch_size=self.mask_patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            head_hidden_size=self.head_hidden_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range,
            mask_ratio=self.mask_ratio,
            attn_implementation=self.attn_implementation,
            teacher_config=copy.deepcopy(self.teacher_config),
            **extra_fields,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def fixed_bool_masked_pos(self, batch_size: int) -> torch.BoolTensor:
        """The same `num_masks` patches masked in every image: `MimCoForPreTraining` would otherwise draw a new
        random mask on every call, and the common tests compare calls."""
        mask = torch.zeros(batch_size, self.mask_length, dtype=torch.bool)
        mask[:, : self.num_masks] = True
        return mask.to(torch_device)

    def create_and_check_model(self, config, pixel_values, labels):
        model = MimCoModel(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def create_and_check_for_pretraining(self, config, pixel_values, labels):
        model = MimCoForPreTraining(config).to(torch_device).eval()
        bool_masked_pos = self.fixed_bool_masked_pos(self.batch_size)
        result = model(pixel_values, bool_masked_pos=bool_masked_pos)
        teacher_width = config.get_teacher_config().hidden_size
        self.parent.assertEqual(result.loss.shape, ())
        self.parent.assertEqual(result.patch_predictions.shape, (self.batch_size * self.num_masks, teacher_width))
        self.parent.assertEqual(result.image_predictions.shape, (self.batch_size, teacher_width))

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        config.num_labels = self.type_sequence_label_size
        model = MimCoForImageClassification(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))

        # greyscale images
        config.num_channels = 1
        config.image_mean, config.image_std = [0.5], [0.5]
        config.teacher_image_mean, config.teacher_image_std = [0.5], [0.5]
        model = MimCoForImageClassification(config).to(torch_device).eval()
        result = model(floats_tensor([self.batch_size, 1, self.image_size, self.image_size]))
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))


@pytest.mark.usefixtures("one_thread")
class MimCoModelTest(_RegisteredInNameTables, ModelTesterMixin, unittest.TestCase):
    """The three classes of `MimCoConfig`: the backbone, the stage-2 student with its teacher, the classifier."""

    all_model_classes = (MimCoModel, MimCoForPreTraining, MimCoForImageClassification)
    test_resize_embeddings = False  # as ViT: patch embeddings, no vocabulary to resize
    # `_init_weights` must cover every weight; without this the test would skip us for lack of a copyright year
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        super().setUp()
        self.model_tester = MimCoModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=MimCoConfig,
            has_text_modality=False,
            # a config with sub-configs is checked for no common properties unless they are named
            common_properties=["hidden_size", "num_attention_heads", "num_hidden_layers"],
            image_size=32,
            patch_size=4,
            mask_patch_size=8,
            hidden_size=36,
            num_attention_heads=6,
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if model_class is MimCoForPreTraining and "bool_masked_pos" not in inputs_dict:
            batch_size = inputs_dict["pixel_values"].shape[0]
            inputs_dict["bool_masked_pos"] = self.model_tester.fixed_bool_masked_pos(batch_size)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="MimCo, like ViT, does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        # as ViT's: the input embeddings are the patch embeddings, and there are no output embeddings
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, torch.nn.Linear))

    def test_base_model_prefix_loads_base_weights(self):
        # The test takes every child of the base model's class for the base model, and the default teacher is a
        # MimCoModel too (frozen, and deliberately not the base model); with a ViT teacher (a DINO-like teacher)
        # the test checks what it means to: a backbone checkpoint loads into the student of every head.
        self.model_tester.teacher_config = tiny_vit_teacher_config()
        super().test_base_model_prefix_loads_base_weights()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_torch_export_matches_eager(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(copy.deepcopy(config))
                assert_export_matches_eager(self, model, self._prepare_for_class(inputs_dict, model_class))

    def test_for_pretraining(self):
        self.model_tester.create_and_check_for_pretraining(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())


@pytest.mark.usefixtures("one_thread")
class MimCoForPreTrainingWithViTTeacherTest(MimCoModelTest):
    """The stage-2 model with a transformers `ViTModel` teacher (as a DINO teacher): a sub-config and a sub-model of
    another model type."""

    all_model_classes = (MimCoForPreTraining,)

    def setUp(self):
        super().setUp()
        self.model_tester = MimCoModelTester(self, teacher_config=tiny_vit_teacher_config())
        # the teacher as a saved config.json holds it, which is also what the tester expects to read back
        student = {"image_size": 16, "patch_size": 4, "mask_patch_size": 8}
        saved = json.loads(MimCoConfig(**student, teacher_config=tiny_vit_teacher_config()).to_json_string())
        self.config_tester = ConfigTester(
            self,
            config_class=MimCoConfig,
            has_text_modality=False,
            common_properties=["hidden_size", "num_attention_heads", "num_hidden_layers"],
            **student,
            teacher_config=saved["teacher_config"],
        )


class MimCoContrastiveModelTester:
    """A tiny `MimCoContrastiveConfig` (the backbone of `MimCoModelTester`, projector width 32) and two views."""

    def __init__(
        self,
        parent,
        batch_size=4,
        projector_hidden_size=32,
        projection_size=16,
        is_training=True,
        **backbone_kwargs,
    ):
        self.parent = parent
        self.backbone_tester = MimCoModelTester(parent, batch_size=batch_size, **backbone_kwargs)
        self.batch_size = batch_size
        self.projector_hidden_size = projector_hidden_size
        self.projection_size = projection_size
        self.is_training = is_training
        self.image_size = self.backbone_tester.image_size
        self.patch_size = self.backbone_tester.patch_size
        self.num_channels = self.backbone_tester.num_channels
        self.hidden_size = self.backbone_tester.hidden_size
        self.num_hidden_layers = self.backbone_tester.num_hidden_layers
        self.num_attention_heads = self.backbone_tester.num_attention_heads
        self.seq_length = self.backbone_tester.seq_length

    def get_config(self) -> MimCoContrastiveConfig:
        backbone_config = self.backbone_tester.get_config()
        backbone_config.position_embedding_type = "sincos"  # as MoCo v3
        return MimCoContrastiveConfig(
            backbone_config=backbone_config,
            projector_hidden_size=self.projector_hidden_size,
            projection_size=self.projection_size,
        )

    def prepare_config_and_inputs(self):
        shape = [self.batch_size, self.num_channels, self.image_size, self.image_size]
        return self.get_config(), floats_tensor(shape), floats_tensor(shape)

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values_1, pixel_values_2 = self.prepare_config_and_inputs()
        return config, {"pixel_values_1": pixel_values_1, "pixel_values_2": pixel_values_2}

    def create_and_check_model(self, config, pixel_values_1, pixel_values_2):
        model = MimCoForContrastivePreTraining(config).to(torch_device).eval()
        result = model(pixel_values_1, pixel_values_2)
        self.parent.assertEqual(result.loss.shape, ())
        for features in (*result.queries, *result.momentum_keys):
            self.parent.assertEqual(features.shape, (self.batch_size, self.projection_size))


@pytest.mark.usefixtures("one_thread")
class MimCoContrastiveModelTest(_RegisteredInNameTables, ModelTesterMixin, unittest.TestCase):
    """Stage 1 (MoCo v3), the only class of `MimCoContrastiveConfig`."""

    all_model_classes = (MimCoForContrastivePreTraining,)
    test_resize_embeddings = False  # as ViT: patch embeddings, no vocabulary to resize
    # `_init_weights` must cover every weight; without this the test would skip us for lack of a copyright year
    test_can_init_all_missing_weights_before_2023 = True
    # its output is the loss, the queries and the keys: no per-layer hidden states or attentions to return
    has_attentions = False

    def setUp(self):
        super().setUp()
        self.model_tester = MimCoContrastiveModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=MimCoContrastiveConfig,
            has_text_modality=False,
            projector_hidden_size=64,
            projection_size=32,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="MimCo, like ViT, does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(
        reason="Does not apply: the MoCo v3 output is the loss, the queries and the momentum keys, with no per-layer "
        "hidden states; those of its encoder are tested on MimCoModel (as transformers' CLIP tests leave them to the "
        "tower models)"
    )
    def test_hidden_states_output(self):
        pass

    @unittest.skip(
        reason="Does not apply: the MoCo v3 output has no hidden states or attentions to retain gradients on; "
        "MimCoModel's are tested (as transformers' CLIP tests leave them to the tower models)"
    )
    def test_retain_grad_hidden_states_attentions(self):
        pass

    def test_model_get_set_embeddings(self):
        # as ViT's: the input embeddings are the patch embeddings, and there are no output embeddings
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = MimCoForContrastivePreTraining(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_torch_export_matches_eager(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        assert_export_matches_eager(self, MimCoForContrastivePreTraining(config), inputs_dict)


class MimCoBackboneModelTester(MimCoModelTester):
    """`MimCoModelTester`'s tiny encoder (16 px, patch 4: a 4x4 grid) as a backbone returning `out_features`."""

    def __init__(self, parent, out_features=("stage1", "stage2"), use_feature_pyramid=False, **kwargs):
        super().__init__(parent, **kwargs)
        self.out_features = list(out_features)
        self.use_feature_pyramid = use_feature_pyramid
        self.grid_size = self.image_size // self.patch_size

    def get_config(self, **extra_fields) -> MimCoConfig:
        return super().get_config(
            out_features=list(self.out_features), use_feature_pyramid=self.use_feature_pyramid, **extra_fields
        )

    def expected_grid_sizes(self) -> list[int]:
        """The side of each feature map: the patch grid, or the pyramid's 4x, 2x, 1x and 1/2x of it."""
        if self.use_feature_pyramid:
            return [4 * self.grid_size, 2 * self.grid_size, self.grid_size, self.grid_size // 2]
        return [self.grid_size] * len(self.out_features)

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = MimCoBackbone(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), len(self.out_features))
        self.parent.assertEqual(model.channels, [self.hidden_size] * len(self.out_features))
        for feature_map, side in zip(result.feature_maps, self.expected_grid_sizes()):
            self.parent.assertEqual(tuple(feature_map.shape), (self.batch_size, self.hidden_size, side, side))
        if self.use_feature_pyramid:
            return

        # the default: the last stage only
        config = copy.deepcopy(config)
        config.out_indices = None
        model = MimCoBackbone(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(model.out_features, [f"stage{self.num_hidden_layers}"])
        self.parent.assertEqual(
            tuple(result.feature_maps[0].shape), (self.batch_size, self.hidden_size, self.grid_size, self.grid_size)
        )

        # the tokens as they are: CLS first, not normalised (the last block's output before the final norm)
        config.apply_layernorm = False
        config.reshape_hidden_states = False
        model = MimCoBackbone(config).to(torch_device).eval()
        result = model(pixel_values, output_hidden_states=True)
        self.parent.assertEqual(
            tuple(result.feature_maps[0].shape), (self.batch_size, self.seq_length, self.hidden_size)
        )
        torch.testing.assert_close(result.feature_maps[0], result.hidden_states[-1])


@pytest.mark.usefixtures("one_thread")
class MimCoBackboneTest(_RegisteredInNameTables, ModelTesterMixin, BackboneTesterMixin, unittest.TestCase):
    """`MimCoBackbone` under transformers' common model tests and its backbone tests (as DINOv2's and BEiT's
    backbones: `tests/models/{dinov2,beit}/test_modeling_*.py` run both on them)."""

    all_model_classes = (MimCoBackbone,)
    config_class = MimCoConfig  # for `BackboneTesterMixin`'s config tests
    test_resize_embeddings = False  # as ViT: patch embeddings, no vocabulary to resize
    # `_init_weights` must cover every weight; without this the test would skip us for lack of a copyright year
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        super().setUp()
        self.model_tester = MimCoBackboneModelTester(self)

    @unittest.skip(reason="MimCo, like ViT, does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        # as ViT's: the input embeddings are the patch embeddings, and there are no output embeddings
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = MimCoBackbone(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_torch_export_matches_eager(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        assert_export_matches_eager(self, MimCoBackbone(config), inputs_dict)

    def test_retain_grad_hidden_states_attentions(self):
        # The upstream test back-propagates from `outputs[0]`, taken to be a tensor; a backbone's first output is the
        # tuple of feature maps. (It runs on the first of `all_model_classes` only, which for DINOv2 and BEiT is the
        # base model, so their backbones never meet it.) The same check, from the first feature map:
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.output_hidden_states = True
        config.output_attentions = True
        model = MimCoBackbone._from_config(config, attn_implementation="eager").to(torch_device)
        outputs = model(**inputs_dict)
        hidden_states, attentions = outputs.hidden_states[0], outputs.attentions[0]
        hidden_states.retain_grad()
        attentions.retain_grad()
        outputs.feature_maps[0].flatten()[0].backward()
        self.assertIsNotNone(hidden_states.grad)
        self.assertIsNotNone(attentions.grad)


@pytest.mark.usefixtures("one_thread")
class MimCoBackboneWithFeaturePyramidTest(MimCoBackboneTest):
    """`MimCoBackbone` with `use_feature_pyramid`: four blocks' maps at 4x, 2x, 1x and 1/2x the patch grid.

    The common tests all run. Of `BackboneTesterMixin`'s, three change `out_features` to one or two stages, which a
    pyramid refuses (it needs exactly four): here they check that refusal and then run on four other stages.
    """

    def setUp(self):
        super().setUp()
        self.model_tester = MimCoBackboneModelTester(
            self,
            num_hidden_layers=4,
            out_features=("stage1", "stage2", "stage3", "stage4"),
            use_feature_pyramid=True,
        )

    def test_num_layers_is_small(self):
        # Four distinct stages need four blocks; transformers allows BEiT's tests 4 layers for the same reason
        # (BeitForSemanticSegmentation's 4 `out_indices`), where its default for every test is 2.
        self.assertLessEqual(self.model_tester.num_hidden_layers, 4)

    def _check_refuses_other_than_four_stages(self, config):
        for out_indices in (None, [-2, -1]):
            changed = copy.deepcopy(config)
            changed.out_indices = out_indices
            with self.assertRaisesRegex(ValueError, "exactly 4 `out_features`"):
                MimCoBackbone(changed)

    def test_channels(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        self._check_refuses_other_than_four_stages(config)
        config.out_indices = [0, 1, 3, 4]
        model = MimCoBackbone(config)
        self.assertEqual(model.out_features, ["stem", "stage1", "stage3", "stage4"])
        self.assertEqual(model.channels, [self.model_tester.hidden_size] * 4)

    def test_create_from_modified_config(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        self._check_refuses_other_than_four_stages(config)
        config.out_features = ["stem", "stage2", "stage3", "stage4"]
        model = MimCoBackbone(config).to(torch_device).eval()
        with torch.no_grad():
            feature_maps = model(**inputs_dict).feature_maps
        sides = [feature_map.shape[-1] for feature_map in feature_maps]
        self.assertEqual(sides, self.model_tester.expected_grid_sizes())

    def test_backbone_stage_selection(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        self._check_refuses_other_than_four_stages(config)
        config.out_indices = [-4, -3, -2, -1]
        model = MimCoBackbone(config).to(torch_device).eval()
        self.assertEqual(model.out_features, ["stage1", "stage2", "stage3", "stage4"])
        with torch.no_grad():
            self.assertEqual(len(model(**inputs_dict).feature_maps), 4)
