"""FSDP2 (``torch.distributed.fsdp.fully_shard``, gloo, 2 processes on CPU) on a small
SALT transformer:

* each rank holds half of every SALT layer's frozen ``U``, ``V`` (and residual), read
  from the local shards' sizes;
* training (SGD with momentum, the SALT regulariser in the loss) equals one process
  training on the combined batch, float64, to 1e-10;
* ``save_salt`` from the sharded model writes one full adapter (rank 0), and
  ``load_salt`` onto a freshly sharded model reproduces the outputs;
* ``torch.distributed.checkpoint`` save/load of the sharded state round-trips exactly.

One spawn runs every scenario (starting processes dominates the time); the parent
checks what the ranks wrote.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from salt_kernels import SALTLinear, apply_salt, load_salt, salt_regularizer, save_salt, trainable_parameters
from salt_testing import TOLERANCES, max_rel_err

WORLD = 2
STEPS = 3
PER_RANK = 2  # sequences per process per step; the single process sees WORLD * PER_RANK
SEQ, DIM, VOCAB = 5, 16, 11
SALT = dict(rank=6, lora_rank=3, target_modules="all-linear", sigma_mode="scale_shift", residual=True)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d + 1), nn.Linear(2 * d + 1, d)

    def forward(self, h):
        a = self.norm1(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(-1, -2) / math.sqrt(a.shape[-1]), -1)
        h = h + self.out(att @ self.v(a))
        return h + self.fc2(torch.relu(self.fc1(self.norm2(h))))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def _salt_model(seed=0):
    torch.manual_seed(seed)
    return apply_salt(TinyTransformer().double(), **SALT)


def _data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (STEPS, WORLD * PER_RANK, SEQ), generator=g)
    target = torch.randn(STEPS, WORLD * PER_RANK, 3, generator=g, dtype=torch.float64)
    return tokens, target


def _train(model, batches):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.2, momentum=0.9)
    for tokens, target in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(tokens), target) + 0.01 * salt_regularizer(model)
        loss.backward()
        opt.step()


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _full_state(model):
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for n, t in model.state_dict().items()}


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import torch.distributed.checkpoint as dcp

        torch.set_num_threads(1)
        report = {}
        # the parent's weights: an SVD recomputed here (other thread count) differs in
        # the last bits, and the comparison is meant to see FSDP, not LAPACK
        model = _salt_model()
        model.load_state_dict(torch.load(os.path.join(out, "init.pt")))
        unsharded_keys = list(model.state_dict())
        _shard(model)
        report["keys"] = list(model.state_dict())
        assert report["keys"] == unsharded_keys
        report["counts"] = trainable_parameters(model)
        local = lambda name: sum(p.to_local().numel() for n, p in model.named_parameters()  # noqa: E731
                                 if n.endswith("." + name))
        report["local_numel"] = {k: local(k) for k in ("U", "V", "residual_weight")}
        report["frozen_without_grad"] = []

        tokens, target = _data()
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        _train(model, [(tokens[s, shard], target[s, shard]) for s in range(STEPS)])
        report["frozen_without_grad"] = all(p.grad is None for p in model.parameters() if not p.requires_grad)
        report["trained"] = _full_state(model)
        probe = tokens[0]
        with torch.no_grad():
            report["outputs"] = model(probe)

        # save_salt from the sharded model: every rank calls, rank 0 writes
        info = save_salt(model, os.path.join(out, "adapter.safetensors"))
        report["save_info"] = info
        with pytest.raises(FileNotFoundError, match="no_such_dir"):  # fails on every rank, no hang
            save_salt(model, os.path.join(out, "no_such_dir", "a.safetensors"))
        # a fresh copy of the same converted base, with some singular pairs' signs
        # flipped (as another LAPACK could return them): load_salt flips them back on
        # the shards
        fresh = _salt_model(seed=5)
        fresh.load_state_dict(torch.load(os.path.join(out, "init.pt")))
        with torch.no_grad():
            for m in fresh.modules():
                if isinstance(m, SALTLinear):
                    m.U[:, ::2] *= -1
                    m.V[:, ::2] *= -1
        _shard(fresh)
        load_salt(fresh, os.path.join(out, "adapter.safetensors"))
        with torch.no_grad():
            report["reloaded_outputs"] = fresh(probe)

        # torch.distributed.checkpoint round trip of the sharded state
        dcp.save(model.state_dict(), checkpoint_id=os.path.join(out, "dcp"))
        other = _shard(_salt_model(seed=7))
        state = other.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(out, "dcp"))
        other.load_state_dict(state)
        report["dcp"] = _full_state(other)
        torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    model = _salt_model()
    torch.save(model.state_dict(), out / "init.pt")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    reports = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return model, out, reports


def test_fsdp_shards_the_frozen_basis(fsdp_run):
    model, _, reports = fsdp_run
    salt = [m for m in model.modules() if isinstance(m, SALTLinear)]
    assert len(salt) == 13
    for name in ("U", "V", "residual_weight"):
        rows = [getattr(m, name).shape[0] for m in salt]
        row_numel = [getattr(m, name)[0].numel() for m in salt]
        total = sum(r * n for r, n in zip(rows, row_numel))
        # FSDP2 splits dim 0 into ceil(rows / 2)-row chunks: rank 0 the first, rank 1 the rest
        first = sum(math.ceil(r / WORLD) * n for r, n in zip(rows, row_numel))
        assert reports[0]["local_numel"][name] == first
        assert reports[1]["local_numel"][name] == total - first
        for rep in reports:
            assert rep["local_numel"][name] / total <= 0.5 + max(row_numel) * len(salt) / total
    # the counts are of the full tensors, as without sharding
    assert all(rep["counts"] == trainable_parameters(model) for rep in reports)
    assert all(rep["keys"] == list(model.state_dict()) for rep in reports)
    assert all(rep["frozen_without_grad"] for rep in reports)


def test_fsdp_training_matches_single_process(fsdp_run):
    model, _, reports = fsdp_run
    start = {n: t.clone() for n, t in model.state_dict().items()}
    tokens, target = _data()
    _train(model, [(tokens[s], target[s]) for s in range(STEPS)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("alpha", "beta", "X", "Y") for n in trainable)
    for rank, rep in enumerate(reports):
        for name, single in model.state_dict().items():
            if name in trainable:
                assert not torch.equal(single, start[name]), f"{name} did not train"
            else:
                assert torch.equal(single, start[name]) and torch.equal(rep["trained"][name], single), name
            err = max_rel_err(rep["trained"][name], single)
            assert err <= TOLERANCES[torch.float64], f"rank {rank} {name}: {err:.3e}"


def test_fsdp_save_salt_writes_one_full_adapter_and_reloads(fsdp_run, tmp_path):
    model, out, reports = fsdp_run
    files = sorted(p.name for p in out.iterdir() if "adapter" in p.name)
    assert files == ["adapter.safetensors"]  # one file, no temporary left over
    assert reports[0]["save_info"] == reports[1]["save_info"]
    # the file holds the full tensors: load it into an unsharded model
    loaded = load_salt(_salt_model(), out / "adapter.safetensors")
    for name, t in loaded.named_parameters():
        if t.requires_grad:
            assert t.shape == reports[0]["trained"][name].shape
            assert max_rel_err(t.detach(), reports[0]["trained"][name]) <= TOLERANCES[torch.float64], name
    tokens, _ = _data()
    with torch.no_grad():
        unsharded = loaded(tokens[0])
    for rep in reports:
        assert max_rel_err(rep["reloaded_outputs"], rep["outputs"]) <= TOLERANCES[torch.float64]
        assert max_rel_err(unsharded, rep["outputs"]) <= TOLERANCES[torch.float64]


def test_fsdp_distributed_checkpoint_round_trip(fsdp_run):
    _, _, reports = fsdp_run
    for rep in reports:
        assert rep["dcp"].keys() == rep["trained"].keys()
        for name, t in rep["trained"].items():
            assert torch.equal(rep["dcp"][name], t), name


def test_example_train_fsdp_runs_under_torchrun(tmp_path):
    """examples/train_fsdp.py, launched as the docs say (torchrun, 2 processes, gloo),
    with tiny sizes."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "adapter.safetensors"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "examples", "train_fsdp.py"), "--steps", "3", "--dim", "16", "--seq", "6",
           "--batch", "2", "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    held = {int(r): (int(a), int(b)) for r, a, b in re.findall(r"rank (\d): holds (\d+) of (\d+) U/V", run.stdout)}
    assert sorted(held) == [0, 1] and held[0][1] == held[1][1]
    assert held[0][0] + held[1][0] == held[0][1]  # the two halves make the whole
    assert all(local <= 0.55 * full for local, full in held.values())
    diff = float(re.search(r"max \|diff\| = (\S+)", run.stdout).group(1))
    assert diff <= 1e-5, run.stdout
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    assert "trainable params:" in run.stdout and re.search(r"loss: \S+ -> \S+", run.stdout)
