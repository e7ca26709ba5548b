"""Convert Vision Transformer checkpoints to and from MimCo.

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

Pickled inputs are read with `torch.load(..., weights_only=True)` only: a file that would run code is refused.

Examples:

```bash
python scripts/convert_checkpoint.py --input_path vit-s-300ep.pth.tar --output_path mocov3-vit-small
python scripts/convert_checkpoint.py --input_path dino_deitsmall16_pretrain.pth --output_path dino-vit-small
python scripts/convert_checkpoint.py --input_path mimco-vit-small --output_path vit_small_mimco.safetensors
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from modeling_mimco.commands import reports_errors, run_command


@dataclass
class ConversionArguments:
    """Arguments of `convert_checkpoint.py`."""

    input_path: str = field(
        metadata={
            "help": "A MoCo v3 / DINO / timm checkpoint file (converted to MimCo), or a MimCo checkpoint folder "
            "(converted to a timm .safetensors file)."
        }
    )
    output_path: str = field(
        metadata={"help": "The MimCoModel folder to write, or the timm .safetensors file to write."}
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


def convert_checkpoint(args: ConversionArguments):
    """Converts as the command does: a folder input to timm (`convert_to_timm`), a file input to MimCo
    (`convert_to_mimco`); returns what that conversion returns."""
    if Path(args.input_path).is_dir():
        return convert_to_timm(args)
    return convert_to_mimco(args)


@reports_errors
def main(argv: list[str] | None = None):
    """Parses the arguments and converts. Errors end the program with a one-paragraph message (no traceback)."""
    parser = HfArgumentParser(ConversionArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return convert_checkpoint(args)


def cli() -> int:
    """The `mimco-convert` console command."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
