"""CPU timings of the SALT layer variants against the dense layers they replace,
forward and forward+backward (gradients of the input and of every trainable
parameter), timed by the benchmark toolkit (``salt_kernels.tools.bench.timing``: warm-up,
then interleaved rounds; speed-ups are medians of per-round paired ratios).

    PYTHONPATH=. python benchmarks/bench_variants.py [--threads N] [--min-time S] [--rows M]

Timings on a shared machine are noisy: compare ratios within one run.
"""

import argparse

import torch
from torch import nn

from salt_kernels import SALTConv2d, SALTLinear
from salt_kernels.tools.bench import format_columns, layer_step, paired_ratio, time_steps


def time_group(modules: dict, x, min_time: float) -> list[list[str]]:
    """Table lines for modules fed the same input, all timed in one interleaved run per
    mode; speed-ups are over the first module (the dense layer)."""
    g = torch.randn_like(next(iter(modules.values()))(x))
    sets = {name: [((x,), [x] + [p for p in m.parameters() if p.requires_grad], g)] for name, m in modules.items()}
    times = {mode: time_steps({n: layer_step(m, sets[n], mode) for n, m in modules.items()}, "cpu", min_time)
             for mode in ("fwd", "fwd+bwd")}
    base = next(iter(modules))
    lines = []
    for name in modules:
        cells = [name]
        for mode in ("fwd", "fwd+bwd"):
            t, r = times[mode][name], paired_ratio(times[mode][base], times[mode][name])
            cells += [f"{t.median * 1e3:.2f}", f"{r.median:.2f}±{r.spread:.2f}"]
        lines.append(cells)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per module and mode")
    ap.add_argument("--rows", type=int, default=4096, help="rows M of the linear layers' input")
    ap.add_argument("--size", type=int, default=64, help="height and width of the conv layers' input")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; ×dense: speed-up over the dense layer "
          "(median of per-round paired ratios ± half their interquartile range)")

    lin = nn.Linear(768, 768)
    linear = {"nn.Linear 768->768": lin}
    for kw in ({}, {"sigma_mode": "scale_shift"}, {"residual": True}):
        linear[f"SALTLinear r=64 {kw or 'direct'}"] = SALTLinear.from_linear(lin, 64, 8, **kw)
    conv = nn.Conv2d(256, 256, 3, padding=1)  # a SAM-neck-like 3x3 conv
    convs = {"nn.Conv2d 256->256 3x3": conv}
    for kw in ({}, {"residual": True}):
        convs[f"SALTConv2d r=32 {kw or 'direct'}"] = SALTConv2d.from_conv2d(conv, 32, 8, **kw)

    head = ["layer", "fwd ms", "×dense", "fwd+bwd ms", "×dense"]
    lines = time_group(linear, torch.randn(args.rows, 768, requires_grad=True), args.min_time)
    lines += time_group(convs, torch.randn(1, 256, args.size, args.size, requires_grad=True), args.min_time)
    print(f"linear: M={args.rows} rows; conv: input 1x256x{args.size}x{args.size}")
    print(format_columns(head, lines, left=1, group=False))


if __name__ == "__main__":
    main()
