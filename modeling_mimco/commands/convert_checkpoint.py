"""Convert Vision Transformer checkpoints to and from MimCo, and MimCo to a stock transformers ViT.

To MimCo (`input_path` is a file; writes a `MimCoModel` folder: `model.safetensors`, `config.json` with `auto_map`
and the code files, `preprocessor_config.json` for `ViTImageProcessor`). The folder is a ready stage-2 teacher:
`MimCoForPreTraining.from_teacher(output_path)`.

* Official MoCo v3 ViT checkpoints (`vit-s-300ep.pth.tar`...): the momentum encoder by default,
  `--encoder base` for the base encoder; the projector (`head.*`) and predictor are ignored. The model keeps MoCo
  v3's fixed 2-D sin-cos position embeddings (`position_embedding_type="sincos"`).
* Official DINO ViT checkpoints (a plain state dict, or a training checkpoint: its `teacher` entry by default,
  `--checkpoint_key student` for the other).
* Any timm `VisionTransformer` state dict (`.pth`, `.bin`, `.safetensors`) with a CLS token and plain blocks.

The architecture is read from the tensors: width, channels and patch size from `patch_embed.proj.weight`, depth from
the number of `blocks.{i}`, MLP width from `blocks.0.mlp.fc1.weight`, `qkv_bias` from whether
`blocks.0.attn.qkv.bias` exists, resolution from the `pos_embed` grid, mean pooling from timm's `fc_norm`. The
number of attention heads is not visible in any shape: give `--num_attention_heads`, or it is taken from a preset
name (`--model_name`, the MoCo v3 `arch` entry, or the file name: MoCo v3 `vit_small`/`vit_base` have 12 heads,
timm/DeiT/DINO `tiny`/`small`/`base`/`large`/`huge` have 3/6/12/16/16), or else heads of 64 channels are assumed.
`--image_size` resamples the position embeddings (bicubic, as `interpolate_pos_encoding` does) for another resolution.

From MimCo (`input_path` is a MimCo checkpoint folder; writes a timm `.safetensors` state dict): a `MimCoModel` or
`MimCoForImageClassification` (the classifier becomes timm's `head`; a pre-training checkpoint exports its student).
The script prints the `timm.create_model(...)` call that rebuilds the architecture and loads the file.

To stock transformers (`--to vit`; `input_path` is a MimCo checkpoint folder; writes a folder): a `MimCoModel`
becomes a `ViTModel`, a `MimCoForImageClassification` a `ViTForImageClassification` (labels kept), a pre-training
checkpoint its student. The folder (`config.json` of model type `vit`, `model.safetensors`,
`preprocessor_config.json` for `ViTImageProcessor`, no code files) loads with `AutoModel` /
`AutoModelForImageClassification` where only `transformers` is installed, without `trust_remote_code`, and computes
what the MimCo model computes at its resolution (`--image_size` exports for another one: ViT's own
`interpolate_pos_encoding` resamples the position table with another kernel than MimCo's). ViTModel's pooler is written as the identity, so its `pooler_output` is the
normalised CLS token, as MimCo's. What a ViT cannot compute (mean pooling, weights a plain ViT lacks) is refused
with a message naming it; `modeling_mimco/interop/vit_export.py` lists how every config field is carried.

`--to` picks the output; without it a file converts to MimCo and a folder to timm (`--to mimco`, `--to timm` say
so explicitly).

Pickled inputs are read with `torch.load(..., weights_only=True)` only: a file that would run code is refused.

Examples:

```bash
python scripts/convert_checkpoint.py --input_path vit-s-300ep.pth.tar --output_path mocov3-vit-small
python scripts/convert_checkpoint.py --input_path dino_deitsmall16_pretrain.pth --output_path dino-vit-small
python scripts/convert_checkpoint.py --input_path mimco-vit-small --output_path vit_small_mimco.safetensors
python scripts/convert_checkpoint.py --input_path mimco-vit-small --output_path mimco-vit-small-hf --to vit
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from modeling_mimco.commands import argument_parser, reports_errors, run_command


# What `--to` can name: a MimCo folder, a timm state dict, a stock transformers ViT folder.
CONVERSION_TARGETS = ["mimco", "timm", "vit"]


@dataclass
class ConversionArguments:
    """Arguments of `convert_checkpoint.py`."""

    input_path: str = field(
        metadata={
            "help": "A MoCo v3 / DINO / timm checkpoint file (converted to MimCo), or a MimCo checkpoint folder "
            "(converted to a timm .safetensors file, or with `--to vit` to a transformers ViT folder)."
        }
    )
    output_path: str = field(
        metadata={
            "help": "The MimCoModel folder to write, the timm .safetensors file to write, or (`--to vit`) the "
            "transformers ViT folder to write."
        }
    )
    to: str | None = field(
        default=None,
        metadata={
            "help": "What to write: `mimco` (from a checkpoint file), `timm` (a .safetensors file from a MimCo "
            "folder) or `vit` (a folder that stock transformers loads as ViTModel / ViTForImageClassification, "
            "from a MimCo folder). Default: `mimco` for a file, `timm` for a folder.",
            "choices": CONVERSION_TARGETS,
        },
    )
    source_format: str = field(
        default="auto",
        metadata={
            "help": "Layout of a checkpoint file: MoCo v3 is recognised by its `module.*_encoder.*` keys; DINO and "
            "timm share one layout.",
            "choices": ["auto", "mocov3", "dino", "timm"],
        },
    )
    encoder: str = field(
        default="momentum",
        metadata={"help": "Which MoCo v3 encoder to convert.", "choices": ["momentum", "base"]},
    )
    checkpoint_key: str | None = field(
        default=None,
        metadata={
            "help": "Top-level entry of the checkpoint that holds the state dict (default: the file itself when it "
            "is a dict of tensors, else `state_dict`, `model`, `teacher` or `module`)."
        },
    )
    num_attention_heads: int | None = field(
        default=None,
        metadata={"help": "Attention heads per block (not visible in the weights; see the script's docstring)."},
    )
    model_name: str | None = field(
        default=None,
        metadata={
            "help": "A preset name: to MimCo, a timm model name or MoCo v3 arch that sets the head count; to timm, "
            "the model name of the printed `timm.create_model` call."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Target resolution; the position embeddings are resampled when it differs."},
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={"help": "Pixel normalisation mean of the converted model (default: ImageNet's)."},
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={"help": "Pixel normalisation std of the converted model (default: ImageNet's)."},
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A MimCo config (folder or config.json) to convert into; the weights are checked against it "
            "instead of against the inferred config."
        },
    )
    overwrite_output: bool = field(default=False, metadata={"help": "Overwrite an existing output folder or file."})


def convert_to_mimco(args: ConversionArguments):
    """Checkpoint file -> MimCoModel folder. Returns the model."""
    from modeling_mimco import MimCoConfig
    from modeling_mimco.interop.convert import convert_checkpoint_to_mimco

    output_dir = Path(args.output_path)
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output):
        raise ValueError(f"{output_dir} exists and is not empty; pass --overwrite_output to replace its files.")
    config = None
    if args.config_name is not None:
        config = MimCoConfig.from_pretrained(args.config_name)
    model, notes = convert_checkpoint_to_mimco(
        args.input_path,
        output_dir,
        source_format=args.source_format,
        encoder=args.encoder,
        checkpoint_key=args.checkpoint_key,
        num_attention_heads=args.num_attention_heads,
        model_name=args.model_name,
        image_size=args.image_size,
        image_mean=args.image_mean,
        image_std=args.image_std,
        config=config,
    )
    for note in notes:
        print(f"- {note}")
    config = model.config
    print(
        f"Saved MimCoModel ({config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, {config.image_size} px, "
        f"{config.position_embedding_type} position embeddings) to {output_dir}."
    )
    print(f"Use it as a stage-2 teacher: MimCoForPreTraining.from_teacher({str(output_dir)!r}, config)")
    return model


def convert_to_timm(args: ConversionArguments):
    """MimCo checkpoint folder -> timm .safetensors. Returns (model name, create_model kwargs, overlay)."""
    from modeling_mimco.interop.convert import convert_mimco_to_timm, format_timm_create_model_call

    output_file = Path(args.output_path)
    if output_file.exists() and not args.overwrite_output:
        raise ValueError(f"{output_file} exists; pass --overwrite_output to replace it.")
    model_name, kwargs, overlay, notes = convert_mimco_to_timm(
        args.input_path, output_file, image_size=args.image_size, model_name=args.model_name
    )
    for note in notes:
        print(f"- {note}")
    print(f"Saved the timm VisionTransformer state dict to {output_file}. Load it with:")
    print("import timm")
    print(format_timm_create_model_call(model_name, kwargs, overlay))
    return model_name, kwargs, overlay


def convert_to_vit(args: ConversionArguments):
    """MimCo checkpoint folder -> stock transformers ViT folder. Returns the exported `ViTModel` or
    `ViTForImageClassification`."""
    from modeling_mimco.interop.vit_export import export_mimco_to_vit

    output_dir = Path(args.output_path)
    if output_dir.exists() and output_dir.resolve() == Path(args.input_path).resolve():
        raise ValueError(f"--output_path {output_dir} is the input folder; write the ViT export to another folder.")
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output):
        raise ValueError(f"{output_dir} exists and is not empty; pass --overwrite_output to replace its files.")
    code_files = sorted(path.name for path in output_dir.glob("*.py")) if output_dir.is_dir() else []
    if code_files:
        # overwriting would leave them next to the export, which is meant to hold no code
        raise ValueError(
            f"{output_dir} holds code files ({', '.join(code_files)}); write the ViT export to a new folder."
        )
    model, notes = export_mimco_to_vit(args.input_path, output_dir, image_size=args.image_size)
    for note in notes:
        print(f"- {note}")
    config = model.config
    auto_class = "AutoModelForImageClassification" if type(model).__name__.endswith("Classification") else "AutoModel"
    print(
        f"Saved a transformers {type(model).__name__} ({config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, {config.image_size} px) and its "
        f"ViTImageProcessor to {output_dir}. Load it without this package:"
    )
    print(f"from transformers import {auto_class}")
    print(f"model = {auto_class}.from_pretrained({str(output_dir)!r})")
    return model


def exports_line(config) -> str:
    """One line saying which exports the MimCo checkpoint folder of `config` (a `MimCoConfig`) allows: `--to timm`
    always, `--to vit` only what a stock ViT computes exactly (`vit_export.check_vit_exportable`: CLS pooling), and
    ONNX through `interop.onnx_export.export_onnx`. `mimco-finetune` prints it when it has saved its model."""
    from modeling_mimco.errors import one_line
    from modeling_mimco.interop.vit_export import check_vit_exportable

    try:
        check_vit_exportable(config)
        vit = "--to vit (a stock transformers ViT) works"
    except ValueError as error:
        if config.pooling != "cls":
            vit = f"--to vit needs CLS pooling (this model pools by {config.pooling}; fine-tune with --pooling cls)"
        else:
            vit = f"--to vit is refused ({one_line(error)})"
    pooling = "global_pool='avg'" if config.pooling == "mean" else "global_pool='token'"
    return (
        f"Exports (mimco-convert --input_path FOLDER): --to timm works ({pooling}); {vit}; ONNX: "
        "modeling_mimco.interop.onnx_export.export_onnx works (needs the onnx extra)."
    )


def conversion_target(args: ConversionArguments) -> str:
    """The output `args` asks for: `--to`, or by default `timm` for a folder input and `mimco` for a file. Raises
    `ValueError` when `--to` does not fit the input (a folder to MimCo, a file to timm or ViT)."""
    is_folder = Path(args.input_path).is_dir()
    if args.to is None:
        return "timm" if is_folder else "mimco"
    if args.to == "mimco" and is_folder:
        raise ValueError(
            f"--to mimco converts a checkpoint file, but --input_path {args.input_path} is a folder; a MimCo "
            "folder converts --to timm or --to vit."
        )
    if args.to in ("timm", "vit") and not is_folder:
        raise ValueError(
            f"--to {args.to} converts a MimCo checkpoint folder, but --input_path {args.input_path} is not a folder."
        )
    return args.to


def convert_checkpoint(args: ConversionArguments):
    """Converts as the command does: to MimCo (`convert_to_mimco`), timm (`convert_to_timm`) or a transformers ViT
    (`convert_to_vit`), as `conversion_target` picks; returns what that conversion returns."""
    target = conversion_target(args)
    if target == "vit":
        return convert_to_vit(args)
    if target == "timm":
        return convert_to_timm(args)
    return convert_to_mimco(args)


@reports_errors
def main(argv: list[str] | None = None):
    """Parses the arguments and converts. Errors end the program with a one-paragraph message (no traceback)."""
    parser = argument_parser(ConversionArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return convert_checkpoint(args)


def cli() -> int:
    """The `mimco-convert` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
