"""A frozen weight quantized by bitsandbytes: the residual of a SALT layer on a 4-bit base.

With ``residual=True`` a SALT layer is ``W = U_r diag(sigma0) V_r^T + W_res``. The top
singular directions carry most of ``W``'s energy, so ``W_res`` has a flatter spectrum
and quantizes with less error than ``W`` itself (the QPiSSA / LoftQ observation). A
layer built with ``quantize=`` keeps ``U_r``, ``V_r`` and ``sigma`` in its compute dtype
and only ``W_res`` in bitsandbytes' formats:

* ``"nf4"`` / ``"fp4"``: blockwise 4-bit (QLoRA's format; ``blocksize`` values share one
  absmax scale, and with ``double_quant`` those scales are quantized again to 8 bits in
  blocks of 256);
* ``"int8"``: one absmax scale per output row (the weight format of LLM.int8).

:class:`QuantizedWeight` holds the quantized tensors as buffers (in ``state_dict``, moved
by ``.to(device)``, never cast by ``.to(dtype)``) and dequantizes with bitsandbytes'
kernels. :func:`add_quantized_product` is the residual product ``y += x W_res^T``:
dequantize + one GEMM accumulated into ``y``, and a backward that dequantizes again, so
only the packed weight is kept for backward (as QLoRA does), never a dense copy.

The helpers for bitsandbytes layers (``Linear4bit``, ``Linear8bitLt``, as
``BitsAndBytesConfig(load_in_4bit=True / load_in_8bit=True)`` loads a model) read a
layer's format and dequantize it (:func:`linear_format`, :func:`dequantize_linear`) and
build one from a quantized weight (:meth:`QuantizedWeight.to_bnb_linear`).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

MIN_BITSANDBYTES = "0.47"
QUANT_TYPES = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes.nn.Linear4bit's defaults: blocks of 64, block scales quantized again
DEFAULT_BLOCKSIZE, DEFAULT_DOUBLE_QUANT = 64, True
# bitsandbytes quantizes the 4-bit block scales in blocks of this many (double quantization)
_NESTED_BLOCKSIZE = 256


def import_bitsandbytes():
    """``bitsandbytes`` (>= 0.47, which runs on CPU too), or an ImportError saying how to
    install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(
            "quantize: a quantized residual needs the 'bitsandbytes' package (>= "
            f"{MIN_BITSANDBYTES}): pip install 'bitsandbytes>={MIN_BITSANDBYTES}' (or, in the checkout, "
            "the 'quant' extra: pip install --no-build-isolation -e '.[quant]')"
        ) from exc
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise ImportError(
            f"quantize: needs bitsandbytes >= {MIN_BITSANDBYTES}, found {bitsandbytes.__version__}: "
            f"pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'"
        )
    return bitsandbytes


@dataclass(frozen=True)
class QuantFormat:
    """How a weight is quantized: ``quant_type`` in :data:`QUANT_TYPES`; for the 4-bit
    types the ``blocksize`` and whether the block scales are quantized again
    (``double_quant``); both ``None`` for ``"int8"`` (one scale per row)."""

    quant_type: str
    blocksize: int | None = None
    double_quant: bool | None = None

    def layer_kwargs(self) -> dict:
        """The ``SALTLinear`` arguments that select this format."""
        return {"quantize": self.quant_type, "quantize_blocksize": self.blocksize,
                "quantize_double": self.double_quant}

    def describe(self) -> str:
        if self.quant_type == "int8":
            return "int8 (per-row scales)"
        return f"{self.quant_type} (blocks of {self.blocksize}{', double quantization' if self.double_quant else ''})"


def quant_format(quantize, blocksize=None, double_quant=None) -> QuantFormat | None:
    """Check the ``quantize`` arguments of a layer and fill in the defaults of
    ``bitsandbytes.nn.Linear4bit``; ``None`` when ``quantize`` is ``None``."""
    if quantize is None:
        for name, value in (("quantize_blocksize", blocksize), ("quantize_double", double_quant)):
            if value is not None:
                raise ValueError(f"{name}: only applies with quantize='nf4' or 'fp4', got quantize=None")
        return None
    if not isinstance(quantize, str) or quantize not in QUANT_TYPES:
        raise ValueError(f"quantize: expected None or one of {QUANT_TYPES}, got {quantize!r}")
    if quantize == "int8":
        for name, value in (("quantize_blocksize", blocksize), ("quantize_double", double_quant)):
            if value is not None:
                raise ValueError(f"{name}: only applies to the 4-bit formats ('nf4', 'fp4'); int8 has one "
                                 f"scale per row, got {name}={value!r} with quantize='int8'")
        return QuantFormat("int8")
    if blocksize is None:
        blocksize = DEFAULT_BLOCKSIZE
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}")
    if double_quant is None:
        double_quant = DEFAULT_DOUBLE_QUANT
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantize_double: expected a bool, got {type(double_quant).__name__}")
    return QuantFormat(quantize, blocksize, double_quant)


# --------------------------------------------------------------------------- the weight


class QuantizedWeight(nn.Module):
    """A frozen ``(out_features, in_features)`` weight in a bitsandbytes format.

    Buffers (in ``state_dict``): 4-bit: ``qweight`` (uint8, two values a byte, the layout
    of ``bitsandbytes.functional.quantize_4bit``), ``absmax`` (one scale per block:
    float32, or uint8 with double quantization, then with ``nested_absmax``,
    ``nested_code`` and ``offset``); int8: ``qweight`` (int8) and ``scales`` (float32,
    one per row). A new one holds zeros. ``.to(dtype)`` / ``.half()`` of the module
    leave the buffers' dtypes alone: they are the stored format, not the compute dtype.
    """

    def __init__(self, out_features: int, in_features: int, fmt: QuantFormat, device=None):
        super().__init__()
        import_bitsandbytes()
        if not isinstance(fmt, QuantFormat):
            raise TypeError(f"fmt: expected a QuantFormat, got {type(fmt).__name__}")
        self.out_features, self.in_features, self.format = out_features, in_features, fmt
        n = out_features * in_features
        empty = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        if fmt.quant_type == "int8":
            self.register_buffer("qweight", empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", empty(out_features))
            return
        blocks = math.ceil(n / fmt.blocksize)
        self.register_buffer("qweight", empty((n + 1) // 2, 1, dtype=torch.uint8))
        if fmt.double_quant:
            self.register_buffer("absmax", empty(blocks, dtype=torch.uint8))
            self.register_buffer("nested_absmax", empty(math.ceil(blocks / _NESTED_BLOCKSIZE)))
            # bitsandbytes' signed dynamic 8-bit map, which quantize_4bit uses for the scales
            code = import_bitsandbytes().functional.create_dynamic_map(signed=True)
            self.register_buffer("nested_code", code.to(device=device, dtype=torch.float32))
            self.register_buffer("offset", empty(1))
        else:
            self.register_buffer("absmax", empty(blocks))

    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: QuantFormat) -> "QuantizedWeight":
        """``weight`` (2-D, out x in) quantized in format ``fmt`` on its device."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D (out, in) tensor, got {getattr(weight, 'shape', weight)!r}")
        return cls(weight.shape[0], weight.shape[1], fmt, device=weight.device).quantize_(weight)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> "QuantizedWeight":
        """Store ``weight`` (out x in, any float dtype): 4-bit formats quantize its float32
        values; int8 its float16 ones, as bitsandbytes' ``Int8Params`` does (its CUDA kernel
        takes nothing else), so that every device gives the same bytes."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected shape ({self.out_features}, {self.in_features}), "
                             f"got {tuple(weight.shape)}")
        F = import_bitsandbytes().functional
        W = weight.detach().to(device=self.qweight.device, dtype=torch.float32).contiguous()
        if self.format.quant_type == "int8":
            CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
            self._assign(qweight=CB, scales=SCB)
            return self
        q, state = F.quantize_4bit(W, blocksize=self.format.blocksize, compress_statistics=self.format.double_quant,
                                   quant_type=self.format.quant_type)
        self._assign_4bit(q, state)
        return self

    def _assign(self, **tensors) -> None:
        for name, t in tensors.items():
            buf = getattr(self, name)
            if tuple(t.shape) != tuple(buf.shape) and t.numel() == buf.numel():
                t = t.reshape(buf.shape)  # a 0-dim offset, a (n/2,) packed weight
            if tuple(t.shape) != tuple(buf.shape) or t.dtype != buf.dtype:
                raise ValueError(f"{name}: expected {buf.dtype} of shape {tuple(buf.shape)} for a "
                                 f"{self.out_features}x{self.in_features} {self.format.describe()} weight, "
                                 f"got {t.dtype} of shape {tuple(t.shape)}")
            buf.copy_(t)

    def _assign_4bit(self, q: torch.Tensor, state) -> None:
        if state.nested:
            self._assign(qweight=q.view(torch.uint8), absmax=state.absmax, nested_absmax=state.state2.absmax,
                         nested_code=state.state2.code, offset=state.offset)
        else:
            self._assign(qweight=q.view(torch.uint8), absmax=state.absmax)

    @classmethod
    def from_bnb_linear(cls, module: nn.Module) -> "QuantizedWeight":
        """A copy of the weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, bit for
        bit (a layer whose weight is not quantized yet: quantized as bitsandbytes would)."""
        fmt = linear_format(module, name="module")
        if fmt is None:
            raise TypeError(f"module: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}")
        weight = module.weight
        out = cls(module.out_features, module.in_features, fmt, device=weight.device)
        if weight.is_floating_point():  # not quantized yet, or Linear8bitLt(has_fp16_weights=True)
            return out.quantize_(weight)
        if fmt.quant_type == "int8":
            # after a forward, Linear8bitLt keeps the int8 weight and its scales in .state
            state = getattr(module, "state", None)
            SCB = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
            out._assign(qweight=weight.data, scales=SCB)
        else:
            out._assign_4bit(*_unpacked_4bit(weight))
        return out

    @torch.no_grad()
    def zero_(self) -> "QuantizedWeight":
        """Make it the zero matrix (every scale zero)."""
        for name in ("scales", "absmax", "nested_absmax", "offset"):
            if hasattr(self, name):
                getattr(self, name).zero_()
        return self

    def _quant_state(self, dtype: torch.dtype):
        """The bitsandbytes QuantState of a 4-bit weight, dequantizing to ``dtype``."""
        F = import_bitsandbytes().functional
        state2 = None
        if self.format.double_quant:
            state2 = F.QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=_NESTED_BLOCKSIZE,
                                  dtype=torch.float32)
        return F.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                            blocksize=self.format.blocksize, quant_type=self.format.quant_type, dtype=dtype,
                            offset=self.offset if state2 is not None else None, state2=state2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight, ``(out_features, in_features)`` in ``dtype``, by bitsandbytes' kernels
        (float64: dequantized to float32, which holds it exactly, then cast)."""
        F = import_bitsandbytes().functional
        kernel_dtype = torch.float32 if dtype == torch.float64 else dtype
        if self.format.quant_type == "int8":
            W = F.int8_vectorwise_dequant(self.qweight, self.scales)
        else:
            W = F.dequantize_4bit(self.qweight, self._quant_state(kernel_dtype))
        return W.reshape(self.out_features, self.in_features).to(dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def to_bnb_linear(self, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
        """A ``bitsandbytes.nn.Linear4bit`` (compute dtype ``dtype``) or ``Linear8bitLt``
        holding this weight as it is (no re-quantization) and ``bias``."""
        bnb = import_bitsandbytes()
        has_bias = bias is not None
        if self.format.quant_type == "int8":
            layer = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=has_bias, has_fp16_weights=False,
                                        threshold=0.0, device="meta")
        else:
            layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=has_bias, compute_dtype=dtype,
                                      compress_statistics=self.format.double_quant,
                                      quant_type=self.format.quant_type, device="meta")
        self.store_in(layer, dtype)
        if has_bias:
            layer.bias = nn.Parameter(bias.detach().to(device=self.qweight.device, dtype=dtype, copy=True))
        return layer

    @torch.no_grad()
    def store_in(self, layer: nn.Module, dtype: torch.dtype) -> None:
        """Make a copy of this weight the weight of a bitsandbytes ``Linear4bit`` /
        ``Linear8bitLt`` of the same format (4-bit: dequantizing to ``dtype`` by default)."""
        bnb = import_bitsandbytes()
        if self.format.quant_type == "int8":
            CB, SCB = self.qweight.clone(), self.scales.clone()
            layer.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
            if getattr(layer, "state", None) is not None:  # (a forward moved the old ones there)
                layer.state.CB = layer.state.SCB = None
            return
        state = copy.deepcopy(self._quant_state(dtype))
        layer.weight = bnb.nn.Params4bit(
            self.qweight.clone(), requires_grad=False, quant_state=state, blocksize=self.format.blocksize,
            compress_statistics=self.format.double_quant, quant_type=self.format.quant_type,
            bnb_quantized=True, module=layer)
        layer.quant_state = state

    def _apply(self, fn, recurse=True):
        # Cast nothing: apply fn (a device move, .to(dtype), .half(), ...) to byte views of
        # the float32 scales, which .to(dtype) leaves alone as it does integer tensors.
        floats = {n: b.dtype for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        for n in floats:
            self._buffers[n] = self._buffers[n].view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for n, dtype in floats.items():
                self._buffers[n] = self._buffers[n].view(dtype)

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, {self.format.describe()}"


# --------------------------------------------------------------------------- the product


class _AddQuantizedProduct(torch.autograd.Function):
    """``y += x W^T`` in place for a :class:`QuantizedWeight` W; ``dx = dy W``."""

    @staticmethod
    def forward(ctx, y, x, weight):
        ctx.weight = weight
        y.addmm_(x, weight.dequantize(y.dtype).t())
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        # dequantized again rather than saved: a dense copy per layer would undo the 4 bits
        dx = dy @ ctx.weight.dequantize(dy.dtype) if ctx.needs_input_grad[1] else None
        return dy, dx, None


def add_quantized_product(y: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """Accumulate ``x @ weight^T`` into ``y`` (M, out) in place and return ``y``; ``x``
    (M, in) in ``y``'s dtype. Gradients flow to ``y``'s inputs and to ``x``."""
    return _AddQuantizedProduct.apply(y, x, weight)


# --------------------------------------------------------------------------- bitsandbytes layers


def _bnb_classes():
    # A bitsandbytes layer exists only once bitsandbytes is imported: do not import it
    # (seconds) just to find that a plain model has none.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.nn.Params4bit, bnb.nn.Int8Params


def _unpacked_4bit(weight):
    """(packed data, QuantState) of a quantized Params4bit in bitsandbytes' portable
    layout. On CPUs with AVX512-BF16 a Linear4bit run in eval mode repacks its weight for
    its CPU kernel (``packing_format_for_cpu``); undone here on copies, as bitsandbytes
    does when it saves such a layer (that one private function is the only way back)."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))


def _plain_tensor(t: torch.Tensor) -> bool:
    """A tensor holding its values as they are: not a tensor subclass that stores them
    quantized (torchao's NF4Tensor, say, reports a float dtype); FSDP2's DTensor is plain."""
    if type(t) in (torch.Tensor, nn.Parameter):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def linear_format(module: nn.Module, name: str = "linear") -> QuantFormat | None:
    """The format of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``; ``None`` for a
    plain float layer. Any other layer whose weight is not a plain float tensor is a
    quantized layer type SALT cannot convert: a TypeError naming ``name``."""
    weight = getattr(module, "weight", None)
    classes = _bnb_classes()
    if classes is not None:
        Linear4bit, Linear8bitLt, Params4bit, Int8Params = classes
        if isinstance(module, Linear4bit) and isinstance(weight, Params4bit):
            state = weight.quant_state
            nested = getattr(state, "original_nested", None) if getattr(state, "packing_format_for_cpu", False) \
                else getattr(state, "nested", None)
            return QuantFormat(weight.quant_type, int(weight.blocksize),
                               bool(weight.compress_statistics if nested is None else nested))
        if isinstance(module, Linear8bitLt) and isinstance(weight, Int8Params):
            return QuantFormat("int8")
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and _plain_tensor(weight):
        return None
    what = type(weight).__name__ if not isinstance(weight, torch.Tensor) else f"{type(weight).__name__} of {weight.dtype}"
    raise TypeError(
        f"{name}: a {type(module).__name__} with a {what} weight is a quantized layer type salt_kernels cannot "
        "convert; supported: float nn.Linear, and bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt (int8)"
    )


@torch.no_grad()
def dequantize_linear(module: nn.Module) -> torch.Tensor:
    """The float32 weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (a plain
    layer's weight as float32)."""
    if linear_format(module) is None or module.weight.is_floating_point():
        return module.weight.detach().to(torch.float32)  # (or a bitsandbytes layer not quantized yet)
    return QuantizedWeight.from_bnb_linear(module).dequantize(torch.float32)


@torch.no_grad()
def requantize_linear_(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` (out x in, float) into the bitsandbytes layer ``module``, in
    its own format, replacing its weight (e.g. to merge an update into a 4-bit layer)."""
    fmt = linear_format(module, name="module")
    if fmt is None:
        raise TypeError(f"module: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}")
    QuantizedWeight.from_float(weight, fmt).store_in(module, linear_dtype(module) or torch.float32)


def linear_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a bitsandbytes layer's inputs and outputs have in its model, as far as
    the layer tells: its bias's, else the dtype its 4-bit weight was quantized from;
    None for an int8 layer without bias (its weight was quantized from float16 whatever
    the model's dtype)."""
    if getattr(module, "bias", None) is not None and module.bias.is_floating_point():
        return module.bias.dtype
    weight = module.weight
    if weight.is_floating_point():
        return weight.dtype
    state = getattr(weight, "quant_state", None)
    dtype = getattr(state, "original_dtype", None) or getattr(state, "dtype", None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None
