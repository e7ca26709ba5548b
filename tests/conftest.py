"""Shared helpers for the tests: tiny configs that keep every model a few thousand parameters."""

import atexit
import os
import shutil
import socket
import tempfile


# An empty Hugging Face cache for every run, set before any HF library reads it: the tests then see what CI's fresh
# clone sees (no prepared datasets, no downloaded code modules) instead of whatever this machine cached earlier.
_TEST_HF_HOME = tempfile.mkdtemp(prefix="mimco-tests-hf-home-")
os.environ["HF_HOME"] = _TEST_HF_HOME
for _variable in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE"):
    os.environ.pop(_variable, None)
atexit.register(shutil.rmtree, _TEST_HF_HOME, ignore_errors=True)
# huggingface_hub may otherwise ask the Hub for telemetry settings while it builds request headers
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Under pytest-xdist (`make test` runs one worker per core) every worker and the processes its tests start use one
# thread, so that the workers do not oversubscribe the cores between them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import huggingface_hub.constants  # noqa: E402 (after the cache is set)
import pytest  # noqa: E402 (after the cache is set)
import torch  # noqa: E402 (after the cache is set)
from transformers import ViTConfig  # noqa: E402 (after the cache is set)

from modeling_mimco import MimCoConfig  # noqa: E402 (after the cache is set)


TINY_MIMCO_VALUES = dict(
    image_size=32,
    patch_size=4,
    mask_patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    head_hidden_size=32,
)


def make_tiny_mimco_config(**overrides) -> MimCoConfig:
    """A 32-px, patch-4 (8x8 grid), 2-layer, width-32 `MimCoConfig`; keyword arguments override any field."""
    return MimCoConfig(**{**TINY_MIMCO_VALUES, **overrides})


def make_tiny_vit_teacher_config(**overrides) -> ViTConfig:
    """A DINO-like `transformers.ViTConfig` at 32 px with patch 4, one layer and width 24."""
    values = dict(
        image_size=32,
        patch_size=4,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
    )
    values.update(overrides)
    return ViTConfig(**values)


@pytest.fixture
def tiny_mimco_config():
    """Factory fixture: `tiny_mimco_config(**overrides)` returns a tiny `MimCoConfig`."""
    return make_tiny_mimco_config


@pytest.fixture
def tiny_vit_teacher_config():
    """Factory fixture: `tiny_vit_teacher_config(**overrides)` returns a tiny `transformers.ViTConfig`."""
    return make_tiny_vit_teacher_config


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: on two cores shared with other work, intra-op threads only fight."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def clean_venv_python(tmp_path_factory):
    """The Python of a virtual environment with this one's packages but not `modeling_mimco` (made once per test
    session, see `helpers.clean_process.make_clean_venv`): where a saved folder must load as a user's would."""
    from helpers.clean_process import make_clean_venv

    return make_clean_venv(tmp_path_factory.mktemp("clean-venv") / "venv")


@pytest.fixture
def no_network(monkeypatch):
    """Hub offline mode plus a socket guard: any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert not attempts, f"the code tried to reach the network: {attempts}"


# The longest test files (measured: minutes each), collected first. pytest-xdist hands its workers whole files in
# collection order (`--dist loadfile`), so a long file collected last would keep one worker busy while the other
# idles at the end of the run.
LONGEST_FILES_FIRST = (
    "test_launch.py",
    "test_fsdp.py",
    "test_distributed_failures.py",
    "test_faults.py",
    "test_bad_inputs.py",
    "test_reproduce.py",
    "test_shards.py",
    "test_segmentation.py",
    "test_training.py",
    "test_wheel.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
