"""LoRA adapters with the real `peft` package (the optional extra `.[peft]`), on MimCo's own classifier and on its
stock-ViT export: a few `Trainer` steps, the adapter saved alone, reloaded on the base model, merged; the outputs
are the same at every stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_mimco_config
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from modeling_mimco import MimCoForImageClassification
from modeling_mimco.interop.vit_export import export_mimco_to_vit


peft = pytest.importorskip("peft")

NUM_LABELS = 3
# MimCo's attention is one fused `qkv` Linear and an output `proj`; its MLP `fc1` / `fc2`
MIMCO_ATTENTION_TARGETS = ["qkv", "proj"]
# the installed transformers' ViT: `q_proj`, `k_proj`, `v_proj`, `o_proj` (`query`/`value` in transformers 4)
VIT_ATTENTION_TARGETS = ["q_proj", "v_proj"]


class TinyImages(torch.utils.data.Dataset):
    """16 random 32-px images with random labels."""

    def __init__(self, size: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, NUM_LABELS, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A saved (untrained) MimCo classifier, the base model of every adapter here."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    MimCoForImageClassification(make_tiny_mimco_config(num_labels=NUM_LABELS)).save_pretrained(folder)
    return folder


def _train_a_few_steps(model: torch.nn.Module, output_dir: Path) -> None:
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    Trainer(model=model, args=arguments, train_dataset=TinyImages()).train()


def _logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=pixel_values).logits


def _adapter_round_trip(base_loader, target_modules: list[str], tmp_path: Path) -> dict[str, float]:
    """LoRA on `target_modules` (and the classifier trained whole), trained, saved, reloaded and merged; returns the
    largest output differences of each stage."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, modules_to_save=["classifier"])
    model = peft.get_peft_model(base_loader(), lora)
    pixel_values = TinyImages().pixel_values[:4]
    untrained = _logits(model, pixel_values)
    _train_a_few_steps(model, tmp_path / "trainer")
    trained = _logits(model, pixel_values)
    assert (trained - untrained).abs().max() > 1e-3  # the adapter learnt something

    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    saved = sorted(path.name for path in adapter_dir.iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"], saved  # the adapter alone

    reloaded = peft.PeftModel.from_pretrained(base_loader(), adapter_dir)
    reloaded_logits = _logits(reloaded, pixel_values)
    merged = reloaded.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits = _logits(merged, pixel_values)
    differences = {
        "reloaded vs trained": (reloaded_logits - trained).abs().max().item(),
        "merged vs reloaded": (merged_logits - reloaded_logits).abs().max().item(),
    }
    print(f"\n{type(merged).__name__} LoRA on {target_modules}: largest differences {differences}")
    torch.testing.assert_close(reloaded_logits, trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_logits, reloaded_logits, rtol=0, atol=1e-5)
    return differences


def test_lora_on_mimco_attention_trains_saves_reloads_and_merges(base_folder, tmp_path):
    _adapter_round_trip(
        lambda: MimCoForImageClassification.from_pretrained(base_folder), MIMCO_ATTENTION_TARGETS, tmp_path
    )


def test_lora_on_the_stock_vit_export_with_vits_usual_targets(base_folder, tmp_path):
    vit_folder = tmp_path / "vit"
    export_mimco_to_vit(base_folder, vit_folder)
    pixel_values = TinyImages().pixel_values[:4]
    torch.testing.assert_close(
        _logits(ViTForImageClassification.from_pretrained(vit_folder), pixel_values),
        _logits(MimCoForImageClassification.from_pretrained(base_folder), pixel_values),
        rtol=1e-5,
        atol=1e-5,
    )
    _adapter_round_trip(lambda: ViTForImageClassification.from_pretrained(vit_folder), VIT_ATTENTION_TARGETS, tmp_path)


def test_which_modules_the_usual_targets_match():
    model = MimCoForImageClassification(make_tiny_mimco_config(num_labels=NUM_LABELS))
    # ViT's and LLaMA's usual names match nothing in MimCo: PEFT says so rather than training nothing
    for usual in (["query", "value"], ["q_proj", "v_proj"]):
        with pytest.raises(ValueError, match="not found in the base model"):
            peft.get_peft_model(
                MimCoForImageClassification(make_tiny_mimco_config(num_labels=NUM_LABELS)),
                peft.LoraConfig(target_modules=usual),
            )

    def adapted(lora_config) -> set[str]:
        wrapped = peft.get_peft_model(MimCoForImageClassification(model.config), lora_config)
        return {name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}

    assert adapted(peft.LoraConfig(target_modules=MIMCO_ATTENTION_TARGETS)) == {"qkv", "proj"}
    # "all-linear" takes every Linear: the attention, the MLP, and the classification head too (it is not an output
    # embedding that PEFT would leave out), so name the layers, and train the new head whole with `modules_to_save`
    assert adapted(peft.LoraConfig(target_modules="all-linear")) == {"qkv", "proj", "fc1", "fc2", "classifier"}
    assert adapted(peft.LoraConfig(target_modules=["qkv", "proj", "fc1", "fc2"], modules_to_save=["classifier"])) == {
        "qkv",
        "proj",
        "fc1",
        "fc2",
    }
