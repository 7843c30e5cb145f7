"""Which singular basis an adapter was trained in.

Trained ``X``, ``Y`` live in the singular basis ``U``, ``V``. An SVD is unique only up
to the sign of each singular pair, and two LAPACK builds may disagree;
``truncated_svd`` fixes a convention, but the argmax it relies on can tie. An adapter
file therefore carries, per SALT layer, a tiny *basis check*: for each column of ``U``
the row of its largest entry and that entry. Loading compares the recomputed ``U`` with
the stored entries and flips pairs that disagree (``U_i, V_i -> -U_i, -V_i`` leaves the
base weight unchanged), so the trained model is reproduced whatever sign the SVD
returned, and refuses a base model that is not the one the adapter was trained on.
Randomised ``svd="lowrank"`` is not reproducible beyond signs, so its basis is always
stored.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..nn import sharding

# Tensor-name prefix of the basis check in an adapter file: <prefix><layer>.row / .value
CHECK_PREFIX = "__salt_basis_check__."


def basis_check(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of U: the row of its largest entry and that entry (float32)."""
    Uf = U.detach().float().cpu()
    idx = Uf.abs().argmax(dim=0)
    return idx, Uf[idx, torch.arange(Uf.shape[1])]


@torch.no_grad()
def align_basis(name: str, layer: nn.Module, row: torch.Tensor, value: torch.Tensor, *,
                 caller: str = "load_salt", remedy: str = "save with include_basis=True") -> int:
    """Flip singular pairs of ``layer`` whose sign differs from the saved ones; refuse a
    basis that differs by more than a sign (the error names ``caller`` and suggests
    ``remedy``). Returns the number of flipped pairs."""
    U = sharding.full(layer.U.detach()).float().cpu()
    cols = torch.arange(U.shape[1])
    now = U[row, cols]
    # The stored entry is the largest of a unit column (>= 1/sqrt(D)); the recomputed
    # one must match it in magnitude up to the layer dtype's rounding.
    tol = 2e-2 * value.abs() + 1e-4
    bad = ((now.abs() - value.abs()).abs() > tol).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{caller}: layer {name!r}: the base model's singular vector {i} does not match the "
            f"adapter's (U[{int(row[i])}, {i}] = {now[i].item():.6g}, saved {value[i].item():.6g}). "
            "Is this the base model the adapter was trained on? If it is (e.g. nearly repeated "
            f"singular values), {remedy}."
        )
    flip = (torch.sign(now) != torch.sign(value)).nonzero().flatten()
    if flip.numel():
        # on the full tensors: a sharded U, V takes back its own shard
        for basis in (layer.U, layer.V):
            flipped = sharding.full(basis).clone()
            flipped[:, flip.to(flipped.device)] *= -1
            sharding.assign(basis, flipped)
    return int(flip.numel())


def basis_signs(name: str, layer, spec: dict, tensors: dict) -> torch.Tensor:
    """+-1 per singular pair: how the layer's basis relates to the one the adapter was
    trained in (an SVD is unique up to those signs; see the module docstring)."""
    r = layer.rank
    if spec.get("basis_stored"):
        U_file = tensors[f"{name}.U"].to(torch.float32)
        dots = (U_file * layer.U.detach().float().cpu()).sum(0)
        if ((dots.abs() - 1).abs() > 1e-2).any():
            raise ValueError(f"load_salt: layer {name!r}: the model's basis U is not the adapter's (up to signs); "
                             "adapters in one model must share one base")
        return torch.where(dots < 0, -1.0, 1.0)
    # align_basis flips the pairs of what it is given: give it a copy and compare.
    probe = types.SimpleNamespace(U=layer.U.detach().clone(), V=torch.empty(0, r, device=layer.U.device))
    align_basis(name, probe, tensors[f"{CHECK_PREFIX}{name}.row"], tensors[f"{CHECK_PREFIX}{name}.value"])
    flipped = (probe.U != layer.U).any(0)  # a flip negates the whole column
    return torch.where(flipped.cpu(), -1.0, 1.0)
