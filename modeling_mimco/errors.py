"""Expected failures: the errors whose message is meant for the person running a command, and how it is shown.

Library code raises `ValueError` (a bad argument or value, named in the message), `OSError` (a file or folder, named
in the message) or a `MimCoError` subclass (a run that cannot go on: damaged checkpoints, too many unreadable
images, a loss that stays NaN, an output folder in use). `modeling_mimco.commands.run_command` turns any of these
into one `PROGRAM: error: MESSAGE` line and exit code 1; anything else is a bug and keeps its traceback. Set
`MIMCO_TRACEBACK=1` to see the traceback of an expected error too.
"""

from __future__ import annotations

import os

from safetensors import SafetensorError


class MimCoError(RuntimeError):
    """A failure the package detects on purpose, with a message that says what happened and what to do."""


class ProcessGroupFailure(MimCoError):
    """Another process of a multi-process run died or stopped answering within `--ddp_timeout`.

    Every surviving process reports it (the processes may run on different machines), and a command then ends the
    process at once: a process group whose peer is gone can hang while it is torn down.
    """


# What the commands report as one line; a SafetensorError is a damaged or truncated weights file.
EXPECTED_ERRORS = (MimCoError, ValueError, OSError, SafetensorError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (huggingface_hub's HTTP errors span several), for a command's `error:` line."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def describe_load_error(flag: str, name_or_path: str, error: BaseException) -> str:
    """The message for a checkpoint given as `--flag NAME_OR_PATH` that failed to load.

    A name that is no local path was tried as a Hub repository id; transformers' message then speaks of repo ids
    only, which misleads someone who mistyped a folder.
    """
    if not os.path.exists(name_or_path):
        return (
            f"{flag} {name_or_path!r}: no such file or folder here, and loading it as a Hub repository id failed "
            f"too ({one_line(error)})"
        )
    if isinstance(error, SafetensorError):
        return f"{flag} {name_or_path!r}: a weights file in it is damaged or truncated ({one_line(error)})"
    return f"{flag} {name_or_path!r}: {one_line(error)}"


__all__ = ["EXPECTED_ERRORS", "MimCoError", "ProcessGroupFailure", "describe_load_error", "one_line"]
