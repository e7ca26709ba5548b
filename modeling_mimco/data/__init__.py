"""Where images come from and how they become batches.

`sources` loads a dataset (Hub, local folder, class folders, parquet, the built-in digits, streaming), `decoding`
turns one stored image into RGB, `transforms` holds the augmentations, and `pipeline` applies them to rows and collates
batches. A new kind of data source is added in `sources.py`; a new augmentation in `transforms.py`.
"""
