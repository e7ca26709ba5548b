"""Measuring speed and memory: `make bench` (`benchmark`, built on `measurement`) and the one-GPU check (`gpu_check`).

Nothing else in the package imports this sub-package.
"""
