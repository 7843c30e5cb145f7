"""``SaltConfig``: the options of a SALT adapter, with PEFT's conventions for a method's
config (a default rank, ``init_weights``, identity at init by default)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..model.convert import _check_rank_spec
from ..nn.linear import SIGMA_MODES, SVD_METHODS

# The rank when neither ``rank`` nor ``energy`` is given (LoRA's default ``r``).
DEFAULT_RANK = 8


@dataclass
class SaltConfig(PeftConfig):
    """Configuration of a SALT adapter (see :func:`salt_kernels.apply_salt` for the method).

    rank: an int (capped at each layer's ``min(in, out)``) or a float in (0, 1], the
        fraction of ``min(in, out)`` kept. Default: 8, unless ``energy`` is given.
    energy: instead of ``rank``: keep the smallest rank retaining this fraction of
        ``sum(sigma**2)`` per layer.
    lora_rank: ``r'`` of the ``X (r, r')``, ``Y (r', r)`` update (capped at the layer's
        rank); 0 trains the singular values alone.
    target_modules: module names (exact or dotted suffix), a regex, or ``"all-linear"``;
        default: PEFT's LoRA targets for the model's architecture (``model.config.model_type``).
        ``nn.Linear``, ``transformers`` ``Conv1D`` (GPT-2) and ``nn.Conv2d`` (``groups=1``).
    scaling: ``s`` in ``C = diag(sigma') + s X Y``.
    sigma_mode: ``"direct"`` (train sigma) or ``"scale_shift"`` (``relu(alpha sigma0 + beta)``).
    residual: ``True`` (default): the layer is ``W + U_r (C - Sigma0) V_r^T``, equal to the
        base at init, exportable to LoRA; ``False``: SALT's truncated ``U_r C V_r^T``, which
        replaces the layer (one active adapter at a time).
    init_weights: ``True`` (default): ``X Y = 0`` and ``sigma' = sigma0`` (the identity in
        residual mode); ``False``: a random, non-identity adapter (``Y`` and ``sigma``
        perturbed), as PEFT's methods offer for testing.
    svd: ``"exact"`` or ``"lowrank"`` (randomised; its basis is always saved).
    store_basis: also save ``U``, ``V``, ``sigma0`` in the adapter file (default: only with
        ``svd="lowrank"``).
    backend: the :func:`salt_kernels.salt_linear` backend (``"auto"`` picks the fastest).
    """

    rank: Optional[Union[int, float]] = field(
        default=None, metadata={"help": f"SALT rank r: int, or fraction of min(in, out); default {DEFAULT_RANK}"}
    )
    energy: Optional[float] = field(default=None, metadata={"help": "keep this fraction of the squared spectrum"})
    lora_rank: int = field(default=8, metadata={"help": "rank r' of the X Y update"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "names / regex / 'all-linear' of the layers to adapt (default: by model type, as LoRA)"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "names / regex to skip"})
    scaling: float = field(default=1.0, metadata={"help": "s in diag(sigma') + s X Y"})
    sigma_mode: str = field(default="direct", metadata={"help": "'direct' or 'scale_shift'"})
    residual: bool = field(default=True, metadata={"help": "keep the base weight: W + U_r (C - S_r) V_r^T"})
    init_weights: bool = field(default=True, metadata={"help": "True: identity at init (residual); False: random"})
    svd: str = field(default="exact", metadata={"help": "'exact' or 'lowrank'"})
    store_basis: Optional[bool] = field(default=None, metadata={"help": "save U, V, sigma0 in the adapter"})
    backend: str = field(default="auto", metadata={"help": "salt_linear backend"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra modules trained and saved in full (e.g. a task head)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SALT
        if self.rank is None and self.energy is None:
            self.rank = DEFAULT_RANK
        _check_rank_spec(self.rank, self.energy)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, numbers.Integral) or self.lora_rank < 0:
            raise ValueError(f"lora_rank: expected an int >= 0, got {self.lora_rank!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, numbers.Real) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling: expected a finite float, got {self.scaling!r}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode: expected one of {SIGMA_MODES}, got {self.sigma_mode!r}")
        for key in ("residual", "init_weights"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key}: expected a bool, got {type(getattr(self, key)).__name__}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd: expected one of {SVD_METHODS}, got {self.svd!r}")
        if self.store_basis is not None and not isinstance(self.store_basis, bool):
            raise TypeError(f"store_basis: expected None or a bool, got {type(self.store_basis).__name__}")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                setattr(self, key, set(value))

    @property
    def stores_basis(self) -> bool:
        """Whether the adapter file carries ``U``, ``V``, ``sigma0`` (``store_basis``, or a
        randomised SVD, which is not reproducible)."""
        return self.store_basis if self.store_basis is not None else self.svd == "lowrank"
