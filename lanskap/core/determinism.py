"""The same bytes on any x86-64 CPU: one code path for the math libraries, one thread.

PyTorch (ATen's vectorised kernels), oneDNN (convolutions, matmuls), MKL (BLAS) and NumPy with its OpenBLAS pick
their code by the CPU they find: AVX2 here, AVX-512 there, each with its own rounding, and cache-size-dependent
blocking. Their sums then differ in the last bits, training amplifies that to ~1e-7 in the weights, and the LoRA,
images and metrics no longer match the recorded ones. `pin_cpu_math()` fixes each library to its AVX2 path
(present on every x86-64 server and desktop CPU since 2013-2015) and all of them to one thread: a parallel sum
splits its work by the thread count, and so rounds by it.

The libraries read these settings once, when they load, so `stages/__init__.py` calls this before any stage
imports NumPy or PyTorch. `LANSKAP_CPU_MATH=native` leaves them to choose (faster on big CPUs; the bytes then
depend on the machine). GPU arithmetic is not affected: CUDA runs give their own, GPU-specific bytes.

The thread count is then decided per device by the stages that pick one (`use_threads_for_device`): kept at one
where the CPU computes, and raised to the machine's cores (shared among `accelerate launch`'s processes on it) where
a CUDA device does, so that decoding, augmenting and encoding beside the GPU do not queue on one core. The code
paths stay pinned either way: the libraries read them once, at load. `pin_cpu_math` itself is unchanged by this:
it is part of every built-in model's source digest (lanskap/builtin/sources.py).
"""

import os
import platform
import sys
from pathlib import Path

CPU_THREADS = 1  # the pipeline's CPU runs are small; a 2nd thread on a shared 2-core machine was ~20x slower
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own kernels (elementwise, reductions, softmax, norms)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels (conv, linear), which would use AVX-512 where present
    "MKL_CBWR": "AVX2,STRICT",  # MKL's conditional numerical reproducibility: AVX2 branch, fixed blocking
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",  # NumPy's and SciPy's OpenBLAS: the AVX2 kernels
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512F AVX512_SKX AVX512_ICL AVX512_SPR",  # NumPy's SIMD loops: AVX2
    **{name: str(CPU_THREADS) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
}
REQUIRED_CPU_FLAGS = ("avx2", "fma")  # what the AVX2 paths execute; without them they would crash, not differ
SWITCH = "LANSKAP_CPU_MATH"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where the OS does not list them."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def pinned_settings() -> dict[str, str]:
    """The settings for this machine; exits with a message where they cannot apply (it runs before any stage code,
    outside `run_stage`, so it ends the process itself)."""
    mode = os.environ.get(SWITCH, "pinned")
    if mode not in ("pinned", "native"):
        raise SystemExit(
            f"error: {SWITCH}={mode!r}: use `pinned` (the default: the same bytes on any x86-64 CPU "
            "with AVX2) or `native` (each library's fastest code for this CPU; bytes depend on it)"
        )
    if mode == "native":
        return {}
    threads = {name: PINNED[name] for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return threads  # other architectures have other code paths: their bytes are their own
    flags = cpu_flags()
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flags is not None and flag not in flags]
    if missing:
        raise SystemExit(
            f"error: this CPU lacks {', '.join(missing)}, which the pinned math paths need: set "
            f"{SWITCH}=native to use its own (results then differ from an AVX2 machine's in the last "
            "bits)"
        )
    return PINNED


def native_bf16_cpu() -> bool:
    """Whether CPU bf16 math runs at speed here: the CPU has bf16 instructions and the math libraries may use them
    (LANSKAP_CPU_MATH=native; the pinned AVX2 paths emulate bf16, about 100x slower than fp32)."""
    flags = cpu_flags() or set()
    return os.environ.get(SWITCH) == "native" and any(flag in flags for flag in NATIVE_BF16_FLAGS)


def pin_cpu_math() -> None:
    """Set the libraries' code paths and thread count, for this process and the processes it starts."""
    settings = pinned_settings()
    os.environ.update(settings)
    if settings and "torch" in sys.modules:  # loaded already (an in-process caller): its thread pool can still change
        sys.modules["torch"].set_num_threads(CPU_THREADS)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, e.g. under a job scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_for_device(device_type: str) -> int:
    """The CPU thread count a stage computing on `device_type` should run with, decided per device:

    - on a CPU (the demo, CI), the pinned count (CPU_THREADS): there the CPU does the math whose bytes are
      recorded, and a parallel sum rounds by its thread count;
    - on a CUDA device, the cores shared among the processes `accelerate launch` started on this machine
      (LOCAL_WORLD_SIZE): the GPU does that math, with its own bytes, and the CPU only loads, decodes and encodes
      data, which a single thread would make the bottleneck;
    - with LANSKAP_CPU_MATH=native, whatever the libraries chose (0: leave it).
    Pure, for tests; `use_threads_for_device` applies it."""
    if os.environ.get(SWITCH) == "native":
        return 0
    if device_type != "cuda":
        return CPU_THREADS
    return max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def use_threads_for_device(device_type: str) -> int:
    """Set torch's thread pool and the math libraries' thread variables (read by the processes this one starts, e.g.
    data-loading workers) to `threads_for_device(device_type)`; returns the count (0: left as it was). Leaves
    the pinned code paths (pin_cpu_math) as they are: they are read once, when the libraries load."""
    threads = threads_for_device(device_type)
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ.update(
            {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        )
    return threads
