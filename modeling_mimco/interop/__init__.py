"""Checkpoints as they are stored, ours and other projects'.

`model_folders` is the one place that knows what a saved folder is (MimCo, stage 1, any other ViT) and loads it as a
frozen backbone or a classifier to fine-tune; `vit_checkpoints` reads MoCo v3, DINO and timm checkpoints and maps
their weight names; `convert` writes a MimCo folder from one of them, or a timm file from a MimCo folder;
`vit_export` writes a MimCo folder as a stock transformers ViT folder that loads without remote code; `onnx_export`
writes a MimCo model as an ONNX file (the optional `onnx` extra).
"""
