"""What a process of a multi-process run reports when another process dies or stops answering.

The processes of a run meet in collectives: DDP's gradient all-reduce, the barriers around a checkpoint, the gathers
of the logging window. When a peer dies, gloo and NCCL fail such a collective at once ("Connection closed by peer",
"Connection reset by peer": the peer's sockets closed with it); when a peer hangs or is stopped, the collective fails
only when `--ddp_timeout` runs out ("Timed out waiting ..."). Either reaches the loop as a `RuntimeError` from the
middle of a step. `collective_failure` turns it into a `ProcessGroupFailure` whose one line says what happened, on
which rank, after which step, and which checkpoint `--resume_from_checkpoint latest` will continue from; the commands
print that line and end the process at once (`commands.reports_errors`). The Trainer commands (`mimco-finetune`,
`mimco-segment`) report their failed collectives the same way (`evaluation.finetuning.FineTuningTrainer.train`).
It imports `errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modeling_mimco.errors import MimCoError, ProcessGroupFailure


# Lower-case fragments of the errors gloo, NCCL and torch.distributed raise when a collective's peer is gone.
LOST_PEER_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "communicator was aborted",
    "ncclremoteerror",
)
# ... and when it stopped answering within the process group's timeout
TIMEOUT_MARKERS = ("timed out", "timeout")


@dataclass
class RunPosition:
    """Where a run stands, for a failure's message: its `TrainingState` (`global_step`) once set up, and its steps."""

    state: Any = None
    max_train_steps: int | None = None

    def describe(self) -> str:
        if self.state is None or self.max_train_steps is None:
            return "before the first step"
        return f"after step {self.state.global_step} of {self.max_train_steps}"


def failure_kind(error: BaseException) -> str | None:
    """`"lost"` for a collective whose peer died, `"timeout"` for one whose peer did not answer in time, else
    `None` (any other error, including the package's own)."""
    if not isinstance(error, RuntimeError) or isinstance(error, MimCoError):
        return None
    message = str(error).lower()
    if any(marker in message for marker in LOST_PEER_MARKERS):
        return "lost"
    # a DataLoader worker's timeout is no collective's
    if "dataloader" not in message and any(marker in message for marker in TIMEOUT_MARKERS):
        return "timeout"
    return None


def collective_failure(
    error: BaseException,
    *,
    last_checkpoint: str | None,
    ddp_timeout: int,
    rank: int,
    num_processes: int,
    position: RunPosition,
    resume_flag: str = "--resume_from_checkpoint latest",
) -> ProcessGroupFailure | None:
    """The one-line `ProcessGroupFailure` for a collective that failed in a run of several processes, or `None`
    when `error` is something else (or the run has one process). `last_checkpoint` is the newest complete
    checkpoint, named in the message; `resume_flag` is how the same command continues from it."""
    kind = failure_kind(error)
    if kind is None or num_processes < 2:
        return None
    # With two processes the peer is known; with more, gloo and NCCL name an address, not a rank.
    peer = f"rank {1 - rank}" if num_processes == 2 else "another process"
    if last_checkpoint is None:
        resume_from = "there is no complete checkpoint yet, so the run starts over"
    else:
        resume_from = f"the last complete checkpoint is {last_checkpoint}"
    if kind == "timeout":
        what = (
            f"{peer} did not answer within --ddp_timeout {ddp_timeout} s {position.describe()} "
            "(it hangs or was stopped)"
        )
        how = f"stop every process of the run, then run the same command with {resume_flag}"
    else:
        what = f"lost {peer} {position.describe()} (its connection closed: the process ended)"
        how = f"run the same command with {resume_flag} on every machine"
    return ProcessGroupFailure(f"rank {rank} of {num_processes}: {what}; {resume_from}: {how}.")


__all__ = ["RunPosition", "collective_failure", "failure_kind"]
