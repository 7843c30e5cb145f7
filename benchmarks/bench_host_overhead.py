"""Host overhead of one SALT layer call on the ``triton`` backend: the Python between the
user's call and the kernel launches, measured on a CPU.

    PYTHONPATH=. python benchmarks/bench_host_overhead.py [--min-time 1] [--shape M,K,D,r,r'] [--peft]

At decode a layer's GPU work is a few microseconds, so this host time decides the speed.
The script runs the public call (``salt_linear(..., backend="triton")`` and
``SALTLinear.forward``, forward under ``no_grad`` and forward+backward) with every Triton
kernel launch replaced by a no-op, so what is timed is everything else: validation,
backend resolution, the core ``C``, the cached launch plan, output allocation, autograd.
(Triton's own launcher, which a GPU run adds, is not included.) The Triton interpreter
makes the backend available without a GPU (``TRITON_INTERPRET=1`` is set here); no
kernel runs. For comparison, the same calls on the ``reference`` chain, on the same
(tiny) CPU tensors, measured in the same interleaved rounds: its cost is the host cost
of its ATen ops (their CPU arithmetic at this size is well under a microsecond).

Three measurements, each against the reference chain in the same interleaved rounds: one
``salt_linear`` call, one ``SALTLinear`` call, and ``salt_linear`` per layer of a stack of
8 (``K = D``) run as a model runs them, one backward for all layers (a single-layer
forward+backward also pays ``torch.autograd.grad``'s own fixed cost, about 20 us here,
which a model pays once per step, not per layer). The last line,
``host overhead: forward N us, forward+backward N us per layer call``, is the stacked
figure (medians).

``--peft`` adds a stack of 8 ``nn.Linear(D, D)`` under PEFT with a SALT adapter (residual:
the base layer runs and SALT adds its update) against the same stack with a LoRA adapter
of rank r'. The base layers and LoRA's ops run on the CPU tensors for real, so it takes
D <= 256, where their arithmetic is about a microsecond or less.

Timed by this process's CPU time by default (``--clock wall`` for wall time): the host
code is single-threaded, and on a shared machine other processes' load would otherwise
inflate it.
"""

from __future__ import annotations

import argparse
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend runs on CPU tensors

import torch  # noqa: E402

import salt_kernels  # noqa: E402
from salt_kernels.backends.triton import kernels as tk  # noqa: E402
from salt_kernels.tools.bench import layer_step, paired_ratio, time_steps  # noqa: E402
from salt_kernels.tools.bench.timing import describe, environment  # noqa: E402


def _no_launch(kernel, grid, args, kwargs):
    """Stands in for ``kernel[grid](*args, **kwargs)``: plans, grids and arguments are
    built as for a real launch; only the launch itself is skipped."""


def no_op_launches() -> None:
    tk._launch = _no_launch


def _inputs(M, K, D, r, rl, grad: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = dict(x=torch.randn(M, K, generator=g), U=torch.randn(D, r, generator=g) / D ** 0.5,
             V=torch.randn(K, r, generator=g) / K ** 0.5, sigma=torch.rand(r, generator=g) + 0.5,
             X=torch.randn(r, rl, generator=g), Y=torch.randn(rl, r, generator=g), bias=torch.randn(D, generator=g))
    # sigma, X, Y stay fp32 (master parameters, as for a bf16 model): the r x r core is fp32
    t = {k: v.to(dtype) if k in ("x", "U", "V", "bias") else v for k, v in t.items()}
    trained = ("x", "sigma", "X", "Y", "bias")
    for name in trained:
        t[name].requires_grad_(grad)
    return t, [t[n] for n in trained], torch.randn(M, D, generator=g).to(dtype)


STACK = 8  # layers in the stacked measurement


class _Stack(torch.nn.Module):
    """STACK nn.Linear(D, D) in a row: the model a PEFT adapter is put on (``--peft``)."""

    def __init__(self, D, dtype):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(D, D, dtype=dtype) for _ in range(STACK))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _peft_models(D, r, rl, dtype):
    """The stack with a SALT adapter (rank r, r', residual: the base layer runs, SALT adds
    its update) and with a LoRA adapter of rank r' (what SALT is measured against in PEFT)."""
    from peft import LoraConfig, get_peft_model

    from salt_kernels.peft import SaltConfig

    names = [f"layers.{i}" for i in range(STACK)]
    salt = get_peft_model(_Stack(D, dtype), SaltConfig(rank=r, lora_rank=rl, target_modules=names, residual=True,
                                                       backend="triton"))
    lora = get_peft_model(_Stack(D, dtype), LoraConfig(r=max(rl, 1), target_modules=names))
    return salt, lora


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per step (default 1)")
    ap.add_argument("--shape", default="1,64,64,16,4", help="M,K,D,r,r' (default: decode-like, tiny: 1,64,64,16,4)")
    ap.add_argument("--clock", choices=("process", "wall"), default="process",
                    help="process: this process's CPU time (default; other processes' load does not count), "
                         "wall: wall time")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="dtype of x, the basis and the bias (default float32; sigma, X, Y stay float32)")
    ap.add_argument("--peft", action="store_true",
                    help="also a stack of 8 nn.Linear(D, D) under PEFT: a SALT adapter (residual) against "
                         "a LoRA adapter of rank r' (needs peft)")
    args = ap.parse_args(argv)
    M, K, D, r, rl = (int(v) for v in args.shape.split(","))
    if args.peft and D > 256:
        ap.error(f"--peft: the base layers run on the CPU for real, so D must be at most 256 (got --shape with D={D})")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    # The skipped kernels leave their outputs as torch.empty left them, and the torch ops
    # after them (dX, dY from dC) would then time arithmetic on whatever bytes were there,
    # denormals included (tens of times slower on x86): flush them to zero.
    torch.set_flush_denormal(True)
    no_op_launches()
    t, trained, grad_out = _inputs(M, K, D, r, rl, grad=True, dtype=dtype)
    layer = salt_kernels.SALTLinear(K, D, r, rl, backend="triton", dtype=dtype)
    # A stack of layers (K = D): a model's layers share one backward call, whose own fixed
    # cost (torch.autograd.grad, the engine's start) a single-layer step pays in full.
    stack = [_inputs(M, D, D, r, rl, grad=True, dtype=dtype)[0] for _ in range(STACK)]
    x_stack = torch.randn(M, D).to(dtype).requires_grad_(True)

    def call(backend):
        def forward(x, U, V, sigma, X, Y, bias):
            return salt_kernels.salt_linear(x, U, V, sigma, X, Y, bias, backend=backend)
        return forward

    def module_call(backend):
        def forward(x):
            layer.backend = backend
            return layer(x)
        return forward

    def stack_call(backend):
        def forward(x):
            for a in stack:
                x = salt_kernels.salt_linear(x, a["U"], a["V"], a["sigma"], a["X"], a["Y"], a["bias"], backend=backend)
            return x
        return forward

    layer_trained = [t["x"]] + [p for p in layer.parameters() if p.requires_grad]
    stack_trained = [x_stack] + [a[n] for a in stack for n in ("sigma", "X", "Y", "bias")]
    stack_grad = torch.randn(M, D).to(dtype)
    steps = {}
    for mode in ("fwd", "fwd+bwd"):
        for backend in ("triton", "reference"):
            steps[("salt_linear", backend, mode)] = layer_step(call(backend), [(t, trained, grad_out)], mode)
            steps[("SALTLinear", backend, mode)] = layer_step(module_call(backend), [((t["x"],), layer_trained,
                                                                                     grad_out)], mode)
            steps[("stack", backend, mode)] = layer_step(stack_call(backend), [((x_stack,), stack_trained,
                                                                               stack_grad)], mode)
    if args.peft:
        salt_model, lora_model = _peft_models(D, r, rl, dtype)
        for mode in ("fwd", "fwd+bwd"):
            for name, model in (("SALT", salt_model), ("LoRA", lora_model)):
                trainable = [x_stack] + [p for p in model.parameters() if p.requires_grad]
                steps[("peft", name, mode)] = layer_step(model, [((x_stack,), trainable, stack_grad)], mode)
    names = {k: " ".join(k) for k in steps}
    times = time_steps({names[k]: s for k, s in steps.items()}, "cpu", args.min_time, clock=args.clock)
    print(f"host overhead of one layer call, M={M} K={K} D={D} r={r} r'={rl}, Triton launches replaced by no-ops, "
          f"{args.clock} clock; {describe(environment('cpu', dtype))}")
    per_layer = {}
    for api, label, n in (("salt_linear", "salt_linear, one layer", 1), ("SALTLinear", "SALTLinear, one layer", 1),
                          ("stack", f"salt_linear, per layer of {STACK} stacked", STACK)):
        for mode in ("fwd", "fwd+bwd"):
            tri, ref = times[names[(api, "triton", mode)]], times[names[(api, "reference", mode)]]
            ratio = paired_ratio(ref, tri)
            per_layer[api, mode] = tri.median / n * 1e6
            print(f"  {label:36s} {mode:8s} triton {tri.median / n * 1e6:7.1f} us   reference chain "
                  f"{ref.median / n * 1e6:7.1f} us   reference / triton {ratio.median:.2f}±{ratio.spread:.2f}")
    if args.peft:
        for mode in ("fwd", "fwd+bwd"):
            salt, lora = times[names[("peft", "SALT", mode)]], times[names[("peft", "LoRA", mode)]]
            ratio = paired_ratio(lora, salt)
            print(f"  {'PEFT, per layer of %d stacked' % STACK:36s} {mode:8s} SALT   {salt.median / STACK * 1e6:7.1f} us"
                  f"   LoRA            {lora.median / STACK * 1e6:7.1f} us   LoRA / SALT {ratio.median:.2f}"
                  f"±{ratio.spread:.2f}")
    fwd, fwd_bwd = per_layer["stack", "fwd"], per_layer["stack", "fwd+bwd"]
    print(f"host overhead: forward {fwd:.0f} us, forward+backward {fwd_bwd:.0f} us per layer call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
