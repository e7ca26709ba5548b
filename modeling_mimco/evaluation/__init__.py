"""How good a pre-trained backbone is: frozen-feature evaluation and fine-tuning.

`frozen_features` (feature extraction, linear probe, weighted kNN, t-SNE, the results table), `finetuning` (the
`Trainer` recipe: soft-target loss, MixUp/CutMix, layer decay) and `metrics` (the offline top-k accuracy metric).
"""
