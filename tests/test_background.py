"""`experiments.background.BackgroundRun`, which trains the demo's pixel-MIM row in a second process."""

from __future__ import annotations

import operator
import os
import signal
import time

import pytest
import torch

from modeling_mimco.errors import MimCoError
from modeling_mimco.experiments.background import BackgroundRun


def test_the_result_comes_back_tensors_included(tmp_path):
    """A tensor is copied back whole, not passed as shared memory that ends with the second process."""
    log = tmp_path / "logs" / "second.log"
    with BackgroundRun(torch.full, ((2, 3), 7.0), str(log), "Filling") as run:
        time.sleep(1)  # the second process may well have ended before the result is read
        result = run.result()
    assert torch.equal(result, torch.full((2, 3), 7.0))
    assert log.is_file()


def test_an_expected_error_comes_back_as_one_line_naming_the_log(tmp_path):
    log = tmp_path / "second.log"
    with BackgroundRun(int, ("not a number",), str(log), "Parsing") as run:
        with pytest.raises(MimCoError) as raised:  # a command prints it as its one `error:` line
            run.result()
    message = str(raised.value)
    assert message.startswith("Parsing failed (ValueError: invalid literal for int()")
    assert message.endswith(f"its log: {log}") and "\n" not in message
    assert "Traceback" in log.read_text()  # the second process's output, its traceback here, is kept in the log


def test_a_bug_or_a_killed_process_is_told_apart(tmp_path):
    log = str(tmp_path / "second.log")
    with BackgroundRun(operator.truediv, (1, 0), log, "Dividing") as run:
        with pytest.raises(RuntimeError, match=r"^Dividing failed \(ZeroDivisionError: division by zero\)") as raised:
            run.result()
    assert not isinstance(raised.value, MimCoError)  # a bug keeps its traceback
    with BackgroundRun(time.sleep, (60,), log, "Sleeping") as run:
        time.sleep(2)
        os.kill(run._process.pid, signal.SIGKILL)
        with pytest.raises(MimCoError, match=r"^Sleeping failed \(it stopped with exit code -9 before it sent"):
            run.result()


def test_leaving_the_block_stops_the_second_process(tmp_path):
    with pytest.raises(KeyError):
        with BackgroundRun(time.sleep, (60,), str(tmp_path / "sleep.log"), "Sleeping") as run:
            process = run._process
            raise KeyError("the first process fails")
    assert not process.is_alive()
    assert process.exitcode != 0  # stopped, not finished
