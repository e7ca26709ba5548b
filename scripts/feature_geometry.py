#!/usr/bin/env python
"""How spread out a model's frozen features are: the mean pairwise cosine similarity of the image features.

    python scripts/feature_geometry.py outputs/reproduce-seeds/seed-0/features/teacher.pt \\
        outputs/reproduce-seeds/seed-0/features/mimco.pt

The program lives in `modeling_mimco/experiments/feature_geometry.py`.
"""

import sys

from modeling_mimco.experiments.feature_geometry import cli


if __name__ == "__main__":
    sys.exit(cli())
