"""The studies run from `scripts/`: the built-in demo (`demo`), the CIFAR-10 reproduction (`reproduction`), the
feature-geometry measure (`feature_geometry`) and the dense-transfer study (`dense_transfer`); `pixel_mim` is the
pixel-MIM baseline (SimMIM) that three of them train, with the MimCo student's own arguments. Each builds the
commands' argument dataclasses and calls their library functions, so the defaults are the commands' own. Nothing else in the package imports this sub-package.
"""
