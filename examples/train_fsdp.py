"""Train SALT adapters on a small transformer with FSDP2 (``fully_shard``), then save one
adapter file and load it back onto a freshly sharded model.

Runs on CPU with the gloo backend (no GPU needed):

    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 20

On GPUs use ``--backend nccl`` (each rank then uses ``cuda:LOCAL_RANK``). Each rank holds
1/world of every SALT layer's frozen ``U``, ``V``; the script prints the local sizes.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from salt_kernels import apply_salt, load_salt, print_trainable_parameters, salt_regularizer, save_salt


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        a = self.norm1(h)
        scores = self.query(a) @ self.key(a).transpose(-1, -2) / math.sqrt(a.shape[-1])
        h = h + self.out(torch.softmax(scores, -1) @ self.value(a))
        return h + self.fc2(torch.relu(self.fc1(self.norm2(h))))


class Classifier(nn.Module):
    def __init__(self, vocab: int, dim: int, depth: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def build(args, device):
    """The pretrained base (here: seeded random weights), converted to SALT. Convert
    before sharding: the SVD needs each full weight."""
    torch.manual_seed(args.seed)
    model = Classifier(args.vocab, args.dim, args.depth, args.classes).to(device)
    apply_salt(model, rank=0.25, lora_rank=args.lora_rank,
               target_modules=["query", "key", "value", "out", "fc1", "fc2"])
    model.head.requires_grad_(True)  # a task head trained next to the adapter
    return model


def shard(model):
    """FSDP2: one unit per block, then the root (embedding, head)."""
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def batches(args, rank, world, device):
    """A small synthetic task, cycled: 4 global batches of random sequences, labelled by
    the most frequent token class. Each rank takes its own slice of every global batch."""
    g = torch.Generator().manual_seed(args.seed + 1)
    data = []
    for _ in range(4):
        tokens = torch.randint(0, args.vocab, (args.batch * world, args.seq), generator=g)
        data.append((tokens, (tokens % args.classes).mode(dim=1).values))
    mine = slice(rank * args.batch, (rank + 1) * args.batch)
    for step in range(args.steps):
        tokens, labels = data[step % len(data)]
        yield tokens[mine].to(device), labels[mine].to(device)


def main(args) -> dict:
    """Run on every rank (under torchrun, or spawned by a test). Returns what rank 0
    reports: the losses, the local U/V sizes and the reload check."""
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.backend == "nccl" else "cpu")
    try:
        model = shard(build(args, device))
        if rank == 0:
            print_trainable_parameters(model)  # full (unsharded) counts
        local = sum(p.to_local().numel() for n, p in model.named_parameters() if n.endswith((".U", ".V")))
        full = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".U", ".V")))
        print(f"rank {rank}: holds {local} of {full} U/V elements ({local / full:.1%})", flush=True)

        # only what trains goes to the optimiser: U and V are frozen parameters
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        losses = []
        for tokens, labels in batches(args, rank, world, device):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(tokens), labels) + 1e-3 * salt_regularizer(model)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)

        # every rank calls save_salt (it gathers the shards); rank 0 writes one full file
        save_salt(model, args.out)
        probe = next(batches(args, 0, 1, device))[0]
        with torch.no_grad():
            before = model(probe)
        fresh = shard(build(args, device))  # a fresh copy of the base, sharded
        load_salt(fresh, args.out)  # on every rank
        with torch.no_grad():
            after = fresh(probe)
        diff = (after - before).abs().max().item()
        if rank == 0:
            print(f"saved {args.out}; reloaded onto a fresh sharded model: max |diff| = {diff:.2e}", flush=True)
        return {"losses": losses, "local_uv": local, "full_uv": full, "reload_diff": diff}
    finally:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="gloo", help="process group backend: gloo (CPU) or nccl (GPUs)")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary size")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks")
    p.add_argument("--classes", type=int, default=4, help="output classes")
    p.add_argument("--lora-rank", type=int, default=4, help="r' of the X, Y update")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and the data")
    p.add_argument("--out", default="salt_adapter.safetensors", help="adapter file written by rank 0")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
