"""Benchmark toolkit and the ``salt-bench`` command.

* :mod:`.presets` -- shapes named after real models' layers.
* :mod:`.verify` -- every backend against the float64 dense formula, before timing.
* :mod:`.baselines` -- the dense layer, the official SALT layer, the unfused chain.
* :mod:`.methods` -- what is timed (backends, ``auto``, baselines), inputs, timed steps.
* :mod:`.timing` -- the one way to time: interleaved CPU rounds (min / median, paired
  ratios with their spread), ``triton.testing.do_bench`` on CUDA; peak memory.
* :mod:`.report` -- the one way to report: tables, CSV, JSON; the auto policy a run supports.
* :mod:`.plots` -- bar charts of the speed-ups.
* :mod:`.cli` -- ``salt-bench`` (also ``python -m salt_kernels.tools.bench``).

Scripts under ``benchmarks/`` build on these modules rather than timing on their own.
"""

from .cli import main, min_bytes, parser, run_benchmarks
from .methods import (AUTO, DENSE, OFFICIAL, REFERENCE, Inputs, Method, auto_choice, build_methods, is_interpreted,
                      layer_step, make_input_sets, make_step, salt_inputs)
from .plots import write_plots
from .presets import FULL_PRESETS, PRESETS, Shape, select_shapes
from .report import Row, add_ratios, format_columns, format_table, measured_policy, write_csv, write_json
from .timing import (PEAK_BANDWIDTH_GBPS, Ratio, Timing, device_name, environment, paired_ratio,
                     peak_bandwidth_gbps, peak_memory_bytes, sample_steps, time_step, time_steps)
from .verify import VERIFY_TOLERANCES, verification_passed, verify_backends

__all__ = [
    "AUTO", "DENSE", "FULL_PRESETS", "OFFICIAL", "PEAK_BANDWIDTH_GBPS", "PRESETS", "REFERENCE", "Inputs", "Method",
    "Ratio", "Row", "Shape", "Timing", "VERIFY_TOLERANCES", "add_ratios", "auto_choice", "build_methods",
    "device_name", "environment", "format_columns", "format_table", "is_interpreted", "layer_step",
    "main", "make_input_sets", "measured_policy", "make_step", "min_bytes", "paired_ratio", "parser", "peak_bandwidth_gbps",
    "peak_memory_bytes", "run_benchmarks", "salt_inputs", "sample_steps", "select_shapes", "time_step",
    "time_steps", "verification_passed", "verify_backends", "write_csv", "write_json", "write_plots",
]
