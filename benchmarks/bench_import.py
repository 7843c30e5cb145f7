"""Start-up cost: ``import salt_kernels`` and ``salt-bench --help`` against ``import torch``,
each in a fresh interpreter.

    PYTHONPATH=. python benchmarks/bench_import.py [--rounds 15]

The three commands run in the toolkit's interleaved rounds (``sample_steps``: warmed up,
the order shuffled each round), so load from other processes hits them alike; reported: the median wall time of each and its
ratio to ``import torch`` (median of the per-round paired ratios ± half their
interquartile range, ``salt_kernels.tools.bench.timing.paired_ratio``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from salt_kernels.tools.bench.timing import Timing, paired_ratio, sample_steps

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import salt_kernels": [sys.executable, "-c", "import salt_kernels"],
    "salt-bench --help": [sys.executable, "-m", "salt_kernels.tools.bench", "--help"],
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    steps = {name: (lambda cmd=cmd: subprocess.run(cmd, env=env, check=True, capture_output=True))
             for name, cmd in COMMANDS.items()}
    # block=0: one run per round and step (a run is a whole interpreter start)
    samples = sample_steps(steps, 0.0, min_rounds=args.rounds, block=0.0)
    base = Timing(samples["import torch"], paired=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.rounds} rounds, load average {load:.1f} on {os.cpu_count()} cores")
    for name, s in samples.items():
        t = Timing(s, paired=True)
        r = paired_ratio(t, base)  # this command's time over import torch's
        print(f"  {name:20s} {t.median:6.2f} s   {r.median:.2f}±{r.spread:.2f}x import torch")


if __name__ == "__main__":
    main()
