"""DistributedDataParallel (gloo, 2 processes on CPU) trains a model with SALT layers
(every variant, the regulariser in the loss) to the same parameters as one process
training on the combined batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from salt_kernels import SALTConv2d, SALTLinear, salt_regularizer
from salt_testing import TOLERANCES, max_rel_err

WORLD = 2
STEPS = 4
PER_RANK = 3  # samples per process per step; the single process sees WORLD * PER_RANK


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SALTConv2d.from_conv2d(nn.Conv2d(3, 8, 3, padding=1), 5, 2, sigma_mode="scale_shift")
        self.fc1 = SALTLinear.from_linear(nn.Linear(8 * 6 * 6, 24), 10, 4, residual=True)
        self.fc2 = SALTLinear.from_linear(nn.Linear(24, 5), 5, 3, sigma_mode="scale_shift", residual=True)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _make_model():
    torch.manual_seed(0)
    return Net().double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * PER_RANK, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, WORLD * PER_RANK, 5, generator=g, dtype=torch.float64)
    return x, y


def _train(model, batches, params):
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + 0.01 * salt_regularizer(core)
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in core.named_parameters()}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # the parent's weights: an SVD recomputed here (other thread count) differs in the
        # last bits, and the comparison is meant to see DDP, not LAPACK
        model = _make_model()
        model.load_state_dict(torch.load(os.path.join(out_dir, "init.pt")))
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _data()
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        params = _train(ddp, [(x[s, shard], y[s, shard]) for s in range(STEPS)], ddp.parameters())
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_ddp_gloo_matches_single_process(tmp_path):
    model = _make_model()
    torch.save(model.state_dict(), tmp_path / "init.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)

    x, y = _data()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{m}.{b}" for m in ("conv", "fc1", "fc2") for b in ("U", "V")} | \
        {"fc1.residual_weight", "fc2.residual_weight"}
    single = _train(model, [(x[s], y[s]) for s in range(STEPS)], model.parameters())
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(ddp) == set(single)
        for name in single:
            if name in frozen:  # the frozen basis stays put (no grad, the optimiser skips it)
                assert torch.equal(ddp[name], start[name]) and torch.equal(single[name], start[name]), name
                continue
            assert not torch.equal(single[name], start[name]), f"{name} did not train"
            err = max_rel_err(ddp[name], single[name])
            assert err <= TOLERANCES[torch.float64], f"rank {rank} {name}: {err:.3e}"
