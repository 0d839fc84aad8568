"""Weight sharding for the trainer (learner -> trainer), for base models that do not fit
one GPU: PyTorch's FSDP (``fully_shard``), each of N processes holding 1/N of every
weight, the frozen base model's and the LoRA adapter's alike.

Each decoder layer is sharded on its own, so a forward pass gathers one layer's full
weights at a time and frees them after; the model is loaded on the CPU and each process
moves only its shard to its GPU, so no GPU ever holds the whole model.

The adapter stays a normal peft adapter on disk: `full_lora` and `full_optimizer_state`
gather the full tensors (every rank must call them, in the same order), and
`set_lora` / `local_optimizer_state` cut full tensors back into this rank's shards. The
same functions serve an unsharded model, where they only copy.
"""

from __future__ import annotations

import copy
import gc
import sys
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP over ``model`` (a peft model): each decoder layer, then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    base = model.get_base_model()  # type: ignore[operator]
    # transformers names the blocks that must stay whole (the decoder layers).
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layers to shard "
                         "(_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def release_groups() -> None:
    """Once the process group is destroyed: drop the device meshes' hold on it.

    FSDP's state on a model holds the group, and so does the device mesh, in a registry
    of its own; DTensor's caches keep the mesh alive after the model is gone. Without
    this the destroyed group, its gloo threads with it, would live on until the
    interpreter tore it down at exit, which can abort the process (see `ranks.join`)."""
    if "torch.distributed.device_mesh" not in sys.modules:  # no mesh was ever made
        return
    from torch.distributed.device_mesh import DeviceMesh

    gc.collect()  # a trainer no longer used, and its FSDP state (models hold cycles)
    for obj in gc.get_objects():  # (once, as the process leaves)
        if isinstance(obj, DeviceMesh):
            obj._pg_registry.clear()


def full_lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights as full tensors on the CPU, named as the model names them."""
    return {name: _full(param.detach()).cpu()
            for name, param in model.named_parameters() if "lora_" in name}


@torch.no_grad()
def set_lora(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put the weights of a saved peft adapter (``adapter_model.safetensors``'s keys, which
    drop the adapter's name) into ``model``, each rank keeping its own shard."""
    adapter = f".{model.active_adapter}"
    unused = set(saved)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        key = name.replace(adapter, "")
        if key not in saved:
            raise ValueError(f"the adapter has no weight {key}")
        unused.discard(key)
        param.copy_(_like(saved[key].to(param.dtype), param))
    if unused:
        raise ValueError(f"the adapter has weights the model lacks: {sorted(unused)[:3]}")


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full tensors: the same file whether or not the
    trainer that wrote it was sharded."""
    state = optimizer.state_dict()
    return {**state, "state": {index: {k: _full(v).cpu() if isinstance(v, torch.Tensor) else v
                                       for k, v in entry.items()}
                               for index, entry in state["state"].items()}}


def local_optimizer_state(optimizer: torch.optim.Optimizer,
                          state: dict[str, Any]) -> dict[str, Any]:
    """A state written by `full_optimizer_state`, cut to this rank's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = copy.copy(state)
    state["state"] = {index: {k: _like(v, params[int(index)])
                              if isinstance(v, torch.Tensor) and v.dim() else v
                              for k, v in entry.items()}
                      for index, entry in state["state"].items()}
    return state


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` shaped as ``param`` is held: this rank's shard of it, on its device.
    Every rank has the full tensor, so each takes its slice without communicating."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full.to(param.device)
