"""The studies run from `scripts/`: the built-in demo (`demo`), the CIFAR-10 reproduction (`reproduction`) and the
feature-geometry measure (`feature_geometry`). Each builds the commands' argument dataclasses and calls their library
functions, so the defaults are the commands' own. Nothing else in the package imports this sub-package.
"""
