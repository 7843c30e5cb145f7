"""What the model-level helpers need to work on a model sharded by FSDP2
(``torch.distributed.fsdp.fully_shard``), whose parameters are ``DTensor`` shards.

Gathering a shard (``full``) is a collective: every rank must make the same calls in the
same order, so the helpers that use it (``save_salt``, ``load_salt``) must be called on
every rank of a sharded model.
"""

from __future__ import annotations

import torch
from torch import nn


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from its shards for a DTensor (a collective), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a full ``value``; a DTensor keeps only its own shard,
    sliced locally (every rank holds the whole ``value``: no communication)."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,
                                  param.placements, src_data_rank=None)
    param.copy_(value)


def writer_rank(model: nn.Module) -> tuple[bool, bool]:
    """``(sharded, writes)``: whether the model is sharded, and whether this process
    writes files for it (rank 0 of the default group when sharded, else always)."""
    sharded = is_sharded(model)
    if not sharded:
        return False, True
    import torch.distributed as dist

    return True, dist.get_rank() == 0


def share_outcome(sharded: bool, writes: bool, action):
    """Run ``action`` on the writing rank and hand its result, or its error, to every
    rank, so that a failure on rank 0 (a bad path, a full disk) raises everywhere rather
    than leaving the other ranks waiting in a later collective."""
    if not sharded:
        return action()
    import torch.distributed as dist

    box = [None]
    if writes:
        try:
            box[0] = ("ok", action())
        except Exception as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value
