"""Checkpoints of the pre-training loop and the output folder they are written to.

A checkpoint `OUTPUT/checkpoints/checkpoint-N` is Accelerate's saved state plus `trainer_state.json` (the loop's
counters and log), written into a temporary folder, completed by a manifest of every file's size and SHA-256, then
renamed, so that an interrupted save never looks complete; only the last K are kept. A resume verifies the manifest
before it trusts a checkpoint and, for `latest`, falls back to the previous one. The final model is written
atomically too. The output folder gets a write probe before training and an OS lock for the whole run. It imports
only `errors`, torch, Accelerate, filelock and safetensors; `loop` and `arguments` import it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator

import filelock
import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from modeling_mimco.errors import MimCoError, one_line
from modeling_mimco.training.sharding import check_checkpoint_layout, load_sharded, save_sharded


logger = logging.getLogger(__name__)


CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_NAME = "checkpoint_manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
LOCK_NAME = ".mimco-run.lock"
LOCK_HOLDER_NAME = ".mimco-run.json"


class CheckpointError(MimCoError):
    """A checkpoint folder that is incomplete or damaged."""


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomically(path: str, payload: dict) -> None:
    """Writes `payload` as JSON to `path` through a temporary file, flushed to disk, then renamed into place."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_manifest(folder: str) -> None:
    """Records every file's size and SHA-256, so that damage of any kind (truncation, bytes overwritten in place)
    is found before a resume trusts the checkpoint."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    write_json_atomically(os.path.join(folder, MANIFEST_NAME), {"files": files})


def verify_checkpoint(folder: str) -> None:
    """Raises `CheckpointError` naming the problem unless every file of `folder` is present, complete and unchanged
    (size and SHA-256 as the manifest recorded them; manifests of older versions hold sizes only)."""
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"Checkpoint {folder} has no {MANIFEST_NAME}: it was not completely written.")
    try:
        with open(manifest_path) as handle:
            files = json.load(handle)["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Checkpoint {folder}: {MANIFEST_NAME} is unreadable ({error}).") from error
    for name, recorded in files.items():
        path = os.path.join(folder, name)
        size, sha256 = (recorded, None) if isinstance(recorded, int) else (recorded["size"], recorded["sha256"])
        if not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint {folder} is missing {name}.")
        if os.path.getsize(path) != size:
            raise CheckpointError(
                f"Checkpoint {folder}: {name} has {os.path.getsize(path)} bytes, {size} were written (truncated?)."
            )
        if sha256 is not None and file_sha256(path) != sha256:
            raise CheckpointError(f"Checkpoint {folder}: {name} changed after it was written (checksum mismatch).")


def read_trainer_state(folder: str) -> dict:
    """The loop's counters and log of a checkpoint (`trainer_state.json`); `CheckpointError` if it is unreadable."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as handle:
            state = json.load(handle)
        for key in ("global_step", "epoch", "batches_done_in_epoch", "bad_steps", "log_history"):
            state[key]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Checkpoint {folder}: {TRAINER_STATE_NAME} is unreadable ({error}).") from error
    return state


def list_checkpoints(checkpoint_root: str) -> list[str]:
    """Checkpoint folders under `checkpoint_root`, oldest step first."""
    if not os.path.isdir(checkpoint_root):
        return []
    steps = []
    for name in os.listdir(checkpoint_root):
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
            steps.append(int(name[len(CHECKPOINT_PREFIX) :]))
    return [os.path.join(checkpoint_root, f"{CHECKPOINT_PREFIX}{step}") for step in sorted(steps)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of `output_dir` that was completely written (it has its manifest), or `None`; quick,
    since it reads no checksum: what a failing run names as the checkpoint `latest` will resume from."""
    for folder in reversed(list_checkpoints(os.path.join(output_dir, "checkpoints"))):
        if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
            return folder
    return None


def find_resume_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """Resolves `--resume_from_checkpoint`: `latest` picks the newest checkpoint that verifies (skipping damaged
    ones with a warning) or `None` when there is none; a path must verify."""
    return next(iter(resume_candidates(output_dir, resume_from_checkpoint)), None)


def resume_candidates(output_dir: str, resume_from_checkpoint: str) -> Iterator[str]:
    """The checkpoints to try, best first, each verified just before it is offered: for `latest`, every verified
    checkpoint newest first (a damaged one is skipped with a warning); for a path, that path only."""
    if resume_from_checkpoint != "latest":
        verify_checkpoint(resume_from_checkpoint)
        yield resume_from_checkpoint
        return
    for folder in reversed(list_checkpoints(os.path.join(output_dir, "checkpoints"))):
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            logger.warning(f"Skipping damaged checkpoint: {error}")
            continue
        yield folder


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    state: dict,
    keep: int | None,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> str:
    """Writes `checkpoint-{step}` atomically: into a temporary folder, completed by a manifest, then renamed.

    `sharded`: the FSDP-sharded model and its optimizer, which Accelerate does not hold; every process writes its
    shards of them into `sharded_model/` (torch.distributed.checkpoint), Accelerate the rest.
    """
    checkpoint_root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(checkpoint_root, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(checkpoint_root, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary, safe_serialization=True)
        if sharded is not None:
            save_sharded(temporary, *sharded)
    except RuntimeError as error:
        # torch.save reports a full disk as "basic_ios::clear: iostream error"; say what happened
        if "iostream" not in str(error) and shutil.disk_usage(checkpoint_root).free > 1 << 20:
            raise
        raise OSError(
            errno.ENOSPC,
            f"No space left on the device while writing checkpoint {final} ({one_line(error)}); the previous "
            "checkpoint is intact. Free some space (or lower --checkpoints_total_limit) and resume.",
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary, TRAINER_STATE_NAME), "w") as handle:
            json.dump(state, handle, indent=2)
        _write_manifest(temporary)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if keep is not None:
            for old in list_checkpoints(checkpoint_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final_atomically(save_final: Callable[[torch.nn.Module, str], None], model, output_dir: str) -> None:
    """Runs `save_final` into a temporary folder inside `output_dir`, then renames each entry into place, so that
    an interruption never leaves a final folder with a config but no weights."""
    temporary = os.path.join(output_dir, ".tmp-final")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    save_final(model, temporary)
    for name in sorted(os.listdir(temporary)):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(temporary, name), target)
    os.rmdir(temporary)


def resume(
    accelerator: Accelerator,
    output_dir: str,
    resume_from_checkpoint: str,
    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> dict | None:
    """Loads the newest usable checkpoint into the prepared objects and returns its trainer state.

    With `latest`, a checkpoint that fails to verify or to load is skipped with a warning and the previous one is
    tried; `None` when none is usable (the run starts from scratch). A checkpoint given by path must load.
    `sharded`: the FSDP-sharded model and optimizer, loaded from the checkpoint's `sharded_model/`; a checkpoint of
    the other kind (sharded for an unsharded run, or the reverse) is refused, never skipped.
    """
    for checkpoint in resume_candidates(output_dir, resume_from_checkpoint):
        check_checkpoint_layout(checkpoint, sharded is not None)
        try:
            state = read_trainer_state(checkpoint)
            accelerator.load_state(checkpoint)
            if sharded is not None:
                load_sharded(checkpoint, *sharded)
        except (CheckpointError, SafetensorError, RuntimeError, OSError, ValueError, EOFError) as error:
            message = f"Checkpoint {checkpoint} could not be loaded ({one_line(error)})"
            if resume_from_checkpoint != "latest":
                raise CheckpointError(message) from error
            logger.warning(f"{message}; trying the previous one.")
            continue
        accelerator.print(f"Resumed from {checkpoint} at step {state['global_step']} (epoch {state['epoch']}).")
        return state
    logger.warning(f"No usable checkpoint in {output_dir}/checkpoints: starting from scratch.")
    return None


class OutputDirInUseError(MimCoError):
    """Another run holds the lock of the output folder."""


def check_output_dir(output_dir: str, process_index: int = 0) -> None:
    """Creates `--output_dir` if needed and proves that it is writable (a probe file is written and removed), so
    that a run never trains to the end and then fails at the final save."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} exists and is not a folder.")
    probe = os.path.join(output_dir, f".write-test-{process_index}-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(error.errno, f"--output_dir {output_dir!r} is not writable: {error.strerror}") from None


class OutputDirLock:
    """An exclusive lock on the output folder for the whole run, so that two runs never write into one folder.

    The lock is an OS file lock (`filelock`) on `OUTPUT/.mimco-run.lock`: the kernel releases it when its holder
    dies, so a killed run leaves no lock that blocks the next one. `OUTPUT/.mimco-run.json` names the holder (host,
    pid, start time) for the message a second run gets; one left behind by a dead run is replaced.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.lock = filelock.FileLock(os.path.join(output_dir, LOCK_NAME))
        self.holder_path = os.path.join(output_dir, LOCK_HOLDER_NAME)

    def acquire(self) -> str | None:
        """Takes the lock; returns `None`, or a message naming the run that holds it."""
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            return (
                f"--output_dir {self.output_dir!r} is in use by another run ({self._holder()}): wait for it to "
                "finish, or choose another --output_dir."
            )
        if os.path.exists(self.holder_path):
            logger.info(f"Replacing the stale lock of a run that ended without releasing it ({self._holder()}).")
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json_atomically(self.holder_path, holder)
        return None

    def _holder(self) -> str:
        try:
            with open(self.holder_path) as handle:
                holder = json.load(handle)
            return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.lock.is_locked:
            try:
                os.remove(self.holder_path)
            except FileNotFoundError:
                pass
            self.lock.release()


__all__ = [
    "LOCK_HOLDER_NAME",
    "MANIFEST_NAME",
    "TRAINER_STATE_NAME",
    "CheckpointError",
    "OutputDirInUseError",
    "OutputDirLock",
    "check_output_dir",
    "find_resume_checkpoint",
    "last_complete_checkpoint",
    "list_checkpoints",
    "resume",
    "save_checkpoint",
    "save_final_atomically",
    "verify_checkpoint",
    "write_json_atomically",
]
