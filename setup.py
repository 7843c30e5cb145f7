"""Build script: everything but the compiled extension is in pyproject.toml.

The extension ``salt_kernels._C`` (csrc/) is built ahead of time against the torch
already installed (hence ``pip install --no-build-isolation``):

* the CPU kernels always;
* the CUDA kernels too where they can run or are asked for: torch was built with CUDA,
  a CUDA toolkit is found (``CUDA_HOME``, else ``/usr/local/cuda``, else ``nvcc`` on
  PATH), and torch sees a GPU or ``SALT_KERNELS_BUILD_CUDA=1`` is set (CI sets it: no
  GPU is needed to build). Architectures: ``TORCH_CUDA_ARCH_LIST`` if set, else
  ``DEFAULT_CUDA_ARCH_LIST``: machine code for sm_80 and sm_90 plus PTX, which the
  driver compiles for newer GPUs.

``SALT_KERNELS_NO_EXTENSION=1`` skips the extension; so does a build failure (with a
warning), since the package works without it (the ``reference`` / ``triton`` backends).
``SALT_KERNELS_NO_CUDA=1`` builds the CPU part only, whatever else is set.

The compiled objects stay in ``build/`` (one directory per Python, torch and CUDA
choice), so a second ``pip install -e .`` recompiles only changed sources.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def _cuda_wanted(torch) -> tuple[bool, str]:
    """Whether to build the CUDA part (if a toolkit is found), and why not."""
    if _flag("SALT_KERNELS_NO_CUDA"):
        return False, "SALT_KERNELS_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if _flag("SALT_KERNELS_BUILD_CUDA") or torch.cuda.is_available():
        return True, ""
    return False, "torch sees no GPU (SALT_KERNELS_BUILD_CUDA=1 builds the CUDA part anyway)"


def _extension_kwargs() -> dict:
    if _flag("SALT_KERNELS_NO_EXTENSION"):
        print("salt_kernels: SALT_KERNELS_NO_EXTENSION set, not building the C++/CUDA extension")
        return {}
    try:
        import torch
    except ImportError:
        print("salt_kernels: torch not importable at build time, not building the extension "
              "(install torch first and use pip install --no-build-isolation)")
        return {}

    build_cuda, why = _cuda_wanted(torch)
    cuda_home = _find_cuda_home() if build_cuda else None
    if build_cuda and cuda_home is None:
        why = "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    if cuda_home is not None:
        # Must be set before importing cpp_extension, which reads it at import time.
        os.environ["CUDA_HOME"] = cuda_home
        # Without an explicit list a GPU-less build fails (it asks the absent GPU).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    from torch.utils import cpp_extension

    sources = ["csrc/salt_ops.cpp", "csrc/salt_linear.cpp", "csrc/salt_autograd.cpp", "csrc/cpu/salt_cpu.cpp",
               "csrc/salt_multi.cpp"]
    # -fopenmp: at::parallel_for is a header template; without it the pragma is ignored and
    # our parallel loops run on one thread. libgomp.so.1 resolves to the copy torch loaded.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if cuda_home is not None:
        # The toolkit's own headers first: pip's CUDA headers (nvidia/cu13/include) may be of
        # another 13.x release than nvcc, and must only fill in what the toolkit lacks.
        include_dirs = [str(ROOT / "csrc"), str(Path(cuda_home) / "include")]
        # The torch CUDA wheels ship cuBLAS/cuSPARSE headers here, not in the toolkit dir.
        for site in map(Path, sys.path):
            for sub in ("nvidia/cu13/include", "nvidia/cublas/include", "nvidia/cusparse/include"):
                if (site / sub).is_dir():
                    include_dirs.append(str(site / sub))
        ext = cpp_extension.CUDAExtension(
            "salt_kernels._C",
            sources + ["csrc/cuda/salt_cuda.cu"],
            include_dirs=include_dirs,
            # The shared algorithm (salt_linear.cpp) registers its CUDA instance only here.
            extra_compile_args={"cxx": cxx_flags + ["-DSALT_KERNELS_WITH_CUDA"],
                                "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
            py_limited_api=False,
        )
        print(f"salt_kernels: building the CPU and CUDA extension (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = None
        print(f"salt_kernels: building the CPU extension only: {why}")
    # pip install -e builds in a new temporary directory each time, so every install
    # recompiled everything; torch's ninja build skips objects that are up to date
    # (same command, sources and headers unchanged) when they are kept.
    build_temp = ROOT / "build" / (f"salt_kernels-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-"
                                   + ("cuda" if cuda_home else "cpu"))

    def cpu_only(openmp: bool):
        flags = cxx_flags if openmp else [f for f in cxx_flags if f != "-fopenmp"]
        return cpp_extension.CppExtension("salt_kernels._C", sources, extra_compile_args={"cxx": flags},
                                          extra_link_args=link_flags if openmp else [])

    class BuildExtOptional(cpp_extension.BuildExtension):
        """A failed extension build leaves a working pure-Python package, loudly. Fallbacks,
        in order: CPU part only (if the CUDA part was tried), then without OpenMP (a
        compiler without it, e.g. Apple clang: the kernels' own loops run single-threaded)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(build_temp)

        def run(self):
            fallbacks = ([("the CUDA part", cpu_only(True))] if cuda_home is not None else []) + \
                [("OpenMP (-fopenmp)", cpu_only(False))]
            inplace = self.inplace  # setuptools zeroes it during run() and restores it only on success
            while True:
                self.inplace = inplace
                try:
                    super().run()
                    return
                except Exception as exc:  # compiler missing, toolkit mismatch, ...
                    failure = exc
                if not fallbacks:
                    break
                what, fallback = fallbacks.pop(0)
                print(f"WARNING: salt_kernels: building the extension failed ({failure}); "
                      f"retrying without {what}.", file=sys.stderr)
                self.compiler = None  # build_ext.run makes a fresh one from this
                # Reconfigure the extension in place: setuptools finalized this object
                # (private fields a fresh Extension lacks).
                for attr in ("sources", "include_dirs", "library_dirs", "libraries", "define_macros",
                             "extra_compile_args", "extra_link_args", "runtime_library_dirs", "language"):
                    setattr(self.extensions[0], attr, getattr(fallback, attr))
            print(f"WARNING: salt_kernels: building the C++ extension failed ({failure}); installing "
                  "without it (backends 'cpu' and 'cuda' unavailable).", file=sys.stderr)

    if ext is None:
        ext = cpu_only(True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtOptional.with_options(use_ninja=True)}}


def _extension_kwargs_or_none() -> dict:
    try:
        return _extension_kwargs()
    except Exception as exc:  # e.g. a broken torch.utils.cpp_extension import
        print(f"WARNING: salt_kernels: cannot configure the C++/CUDA extension ({exc}); "
              "installing without it.", file=sys.stderr)
        return {}


setup(**_extension_kwargs_or_none())
