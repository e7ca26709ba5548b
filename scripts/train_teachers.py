#!/usr/bin/env python
"""`make teachers`: the stage-1 teachers that the repository ships (model_cards/teachers/), each trained by the
package's stage 1 until its linear probe stops rising.

The program lives in `modeling_mimco/experiments/teachers.py`; `python scripts/train_teachers.py --help` lists its
flags. From a clone, the CIFAR-10 teacher's data is the copy (Hub `uoft-cs/cifar10` layout) in
`shared/datasets/cifar10` beside the repository, when it is there.
"""

import os
import sys

from modeling_mimco.experiments.teachers import cli


LOCAL_CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "cifar10")


if __name__ == "__main__":
    sys.exit(cli(local_cifar10=LOCAL_CIFAR10))
