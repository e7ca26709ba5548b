"""FSDP2 for the pre-training loop: the trained weights sharded over the processes, the frozen ones kept whole.

`accelerate launch` with an FSDP config (`distributed_type: FSDP`, `fsdp_version: 2`) asks for it. Accelerate's own
FSDP path is not used: it switches to FSDP only on GPUs (on CPUs the config silently trains as DDP), and its
auto-wrap would shard the frozen teacher's blocks like the student's. Instead the loop shards the model itself with
PyTorch's `fully_shard`, on any device, and Accelerate keeps the processes, the data, the schedule and the RNG:

- each transformer block of the trained encoder is its own FSDP unit (one all-gather per block), the rest of the
  trained weights (embeddings, final norm, heads, projector, predictor) belong to the root unit;
- the frozen teacher (stage 2) and the momentum branch (stage 1) are `ignored_params`: plain tensors, whole on every
  process, never all-gathered, never reduced (they take no gradient), read by the EMA and the teacher's forward as
  they are;
- the optimizer is built over the sharded parameters, so its AdamW states are sharded too;
- a checkpoint holds the model and optimizer as one `torch.distributed.checkpoint` folder (`sharded_model/`, each
  process writes its shards) next to Accelerate's state of the rest; it loads on any number of FSDP processes;
- the final model is gathered to the main process and saved as an ordinary (unsharded) folder.

It imports torch and Accelerate, nothing else of the package but `errors`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

from modeling_mimco.errors import MimCoError


# What `accelerate launch` sets for an FSDP config; the loop takes the request over (see `take_fsdp_request`).
ACCELERATE_FSDP_FLAG = "ACCELERATE_USE_FSDP"
# Set by `take_fsdp_request` once the request is accepted: this process trains with FSDP2.
MIMCO_FSDP_FLAG = "MIMCO_USE_FSDP2"
# The checkpoint sub-folder that holds the sharded model and optimizer.
SHARDED_MODEL_DIR = "sharded_model"


class CheckpointLayoutError(MimCoError):
    """A checkpoint written by a sharded (FSDP) run loaded by an unsharded one, or the other way round."""


def take_fsdp_request() -> bool:
    """Whether the launcher asked for FSDP; if so, checks what it asked and takes the request over from Accelerate.

    Call it before the `Accelerator` is built: the launcher's flag is removed from the environment, so that
    Accelerate sets up plain processes (it would otherwise prepare FSDP itself on GPUs and ignore it on CPUs), and
    `MIMCO_USE_FSDP2` records the request for `fsdp_enabled`. Raises `ValueError` for what is not supported.
    """
    if os.environ.get(MIMCO_FSDP_FLAG) == "true":  # already taken over in this process
        return True
    if os.environ.get(ACCELERATE_FSDP_FLAG, "false").lower() not in ("true", "1", "yes"):
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(
            "FSDP: the MimCo pre-training scripts support FSDP2 only; add `fsdp_version: 2` under `fsdp_config` in the "
            "accelerate config (see the README)."
        )
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("FSDP: parameter offloading (fsdp_offload_params) is not supported; set it to false.")
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise ValueError("FSDP: fsdp_activation_checkpointing is not supported by the MimCo pre-training scripts.")
    del os.environ[ACCELERATE_FSDP_FLAG]
    os.environ[MIMCO_FSDP_FLAG] = "true"
    return True


def fsdp_enabled() -> bool:
    """Whether this process trains with FSDP2 (`take_fsdp_request` accepted the launcher's request)."""
    return os.environ.get(MIMCO_FSDP_FLAG) == "true"


@dataclass
class ShardingPlan:
    """How a model is sharded: which blocks are FSDP units of their own, which sub-modules are never sharded.

    `blocks` are the trained encoder's transformer blocks; every other trained weight belongs to the root unit.
    `replicated` are the modules that are never trained (the frozen teacher, the momentum encoder and projector):
    whole on every process and left alone by FSDP.
    """

    blocks: Sequence[nn.Module]
    replicated: Sequence[nn.Module] = field(default_factory=tuple)

    def replicated_parameters(self) -> set[nn.Parameter]:
        return {parameter for module in self.replicated for parameter in module.parameters()}


@dataclass
class ShardedModel:
    """A model sharded by `shard_model`, with the unsharded skeleton that the final save fills (`gather_for_saving`)."""

    model: nn.Module
    skeleton: nn.Module


def shard_model(model: nn.Module, plan: ShardingPlan, device: torch.device) -> ShardedModel:
    """Shards `model` in place with FSDP2 per `plan` (blocks, then the root) and returns it with its skeleton.

    The skeleton is an unsharded copy whose trained weights live on the meta device (no memory) and whose
    replicated modules are the model's own: the final save loads the gathered weights into it.
    """
    replicated = plan.replicated_parameters()
    for parameter in replicated:
        if parameter.requires_grad:
            raise ValueError("FSDP: a replicated module has trainable parameters; only frozen modules stay whole.")
    model.to(device)  # `fully_shard` moves only what it manages; the replicated modules go to the device here
    skeleton = _meta_copy(model, replicated)
    # reshard_after_forward: the launcher's fsdp_reshard_after_forward (ZeRO-3 when true, ZeRO-2-like when false)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for block in plan.blocks:
        block_replicated = {p for p in block.parameters() if p in replicated}
        if block_replicated:
            raise ValueError("FSDP: a block to shard lies inside a replicated module.")
        fully_shard(block, reshard_after_forward=reshard)
    # the root keeps its own (embeddings, heads) gathered from forward to backward, as FSDP2 does for a root
    fully_shard(model, ignored_params=replicated)
    return ShardedModel(model=model, skeleton=skeleton)


def _meta_copy(model: nn.Module, shared: set[nn.Parameter]) -> nn.Module:
    """A deep copy of `model` whose parameters are on the meta device, except `shared`, which are the same objects."""
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        if parameter in shared:
            memo[id(parameter)] = parameter
        else:
            memo[id(parameter)] = nn.Parameter(
                torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad
            )
    return copy.deepcopy(model, memo)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded tensor (an all-gather for a DTensor shard, a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gather_for_saving(sharded: ShardedModel, accelerator: Accelerator) -> nn.Module | None:
    """The trained model, unsharded, on the main process's CPU (`None` elsewhere); every process must call it.

    The full state dict is all-gathered parameter by parameter onto the main process's CPU and assigned into the
    skeleton (whose buffers, copied when the model was sharded, are replaced too), so the final folder is written by
    the model's own `save_pretrained`, as a DDP run writes it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(sharded.model, options=options)
    if not accelerator.is_main_process:
        return None
    skeleton = sharded.skeleton
    skeleton.load_state_dict(state, assign=True)
    return skeleton


def _model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Writes the sharded model and optimizer into `folder/sharded_model` (every process its shards)."""
    dcp.save(_model_and_optimizer_state(model, optimizer), checkpoint_id=os.path.join(folder, SHARDED_MODEL_DIR))


def load_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads `folder/sharded_model` into the sharded model and optimizer, resharded to this run's processes."""
    state = _model_and_optimizer_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(folder, SHARDED_MODEL_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def check_checkpoint_layout(folder: str, sharded: bool) -> None:
    """Raises `CheckpointLayoutError` when `folder` was written by a sharded run and this one is not, or vice versa."""
    has_shards = os.path.isdir(os.path.join(folder, SHARDED_MODEL_DIR))
    if has_shards and not sharded:
        raise CheckpointLayoutError(
            f"Checkpoint {folder} was written by an FSDP run (its model and optimizer are sharded): resume it with "
            "the FSDP accelerate config, or start in a new --output_dir."
        )
    if sharded and not has_shards:
        raise CheckpointLayoutError(
            f"Checkpoint {folder} was written by a run without FSDP: resume it without the FSDP config (DDP or one "
            "process), or start in a new --output_dir."
        )


def _local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # this process's shard of a DTensor
        total += local.numel() * local.element_size()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The bytes of model state this process holds: the trained parameters (their local shards under FSDP), their
    gradients (as many bytes while they exist, between backward and the optimizer step), AdamW's states and the
    frozen weights (teacher, momentum branch; whole on every process). Activations and DDP's gradient buckets (one
    more gradient copy) are not counted."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    trained = _local_bytes(p for p in model.parameters() if p.requires_grad)
    states = (value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))
    return {
        "trained_parameters": trained,
        "gradients": trained,
        "optimizer_states": _local_bytes(states),
        "frozen_parameters": _local_bytes(p for p in model.parameters() if not p.requires_grad),
    }


__all__ = [
    "MIMCO_FSDP_FLAG",
    "SHARDED_MODEL_DIR",
    "CheckpointLayoutError",
    "ShardedModel",
    "ShardingPlan",
    "check_checkpoint_layout",
    "fsdp_enabled",
    "full_tensor",
    "gather_for_saving",
    "load_sharded",
    "save_sharded",
    "shard_model",
    "state_bytes",
    "take_fsdp_request",
]
