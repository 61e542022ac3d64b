"""Device choice: `auto` picks CUDA, then Apple MPS, then CPU. No device name is hard-coded
elsewhere; everything takes the torch.device chosen here.

And what the chosen device can do, asked in one place by training, prior fits and the benchmarks:
whether torch.compile runs there and with which options, whether bf16 is native, and which CPU
kind a benchmark's figures were measured on."""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
from pathlib import Path

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend and backend.is_available())
    return False


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> the best available device; an explicit name must be available."""
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if base == "auto":
        for kind in ("cuda", "mps", "cpu"):
            if _available(kind):
                return torch.device(kind)
    if not _available(base):
        raise ValueError(f"device {name!r} was requested but is not available on this machine "
                         f"(use --device auto or cpu)")
    return torch.device(name)


def as_device(device=None) -> torch.device:
    """None -> the CPU; a name through resolve_device ("auto", "cpu", "cuda:1"); a torch.device as is."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        return resolve_device(device)
    return torch.device(device)


# ------------------------------------------------------------- what the device can do
# Inductor's own random numbers (a Philox counter per element, scalar C++ on a CPU) made the Gumbel
# noise of a compiled step slower than eager's: +8% images/s for gaussian_1 at the paper preset with
# torch's generator instead (benchmarks/train_throughput.py). Every random draw of a compiled step then
# comes from torch's seeded generator, as in eager: on a CPU the Gumbel noise is one key from it per
# step, hashed in the graph (quantizers.counter_uniform); elsewhere the very numbers eager draws.
COMPILE_OPTIONS = {"fallback_random": True}


def compile_options(device: torch.device) -> dict:
    """torch.compile options for the training step on `device`. On a CPU the compiled graph's host
    code is C++ as well (inductor's cpp_wrapper): the step's ~70 buffer allocations and ~40 kernel
    calls stop going through Python. Same kernels, same numbers; +1.7-3.9% images/s at the paper
    preset (benchmarks/train_throughput.py --python-wrapper) for about 2 s more compile time. The
    prior's 120 ms steps gain nothing measurable from it and keep COMPILE_OPTIONS."""
    return {**COMPILE_OPTIONS, "cpp_wrapper": True} if device.type == "cpu" else dict(COMPILE_OPTIONS)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on this device, or None if it can."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return ("torch.compile on a CPU needs a C++ compiler (it generates C++): install g++ "
                "(Debian: apt-get install g++)")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on a GPU needs triton (pip install triton)"
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {device.type}"
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # mallopt's parameter numbers in glibc's <malloc.h>


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep memory that a training step frees for the next step.

    By default glibc unmaps a freed block above its moving mmap threshold at once, and trims the
    heap once more than twice that threshold lies free at its top. A step frees most of what it
    allocated, so the next step gets the memory back as new pages, and the kernel zeroes each page
    at its first touch. fit_prior calls this: its compiled step, timed alone, took about 8,000 such
    faults and 12% more time a step without it (benchmarks/RESULTS.md). How much a whole fit
    gains varies, since other allocations can pin the heap's top and stop the trimming by chance.
    Fixed thresholds keep the pages in the process between steps: mmap above 32 MiB (glibc's
    ceiling for the moving threshold), trim above 256 MiB free. Peak RSS stays the same, since the
    step used those pages anyway. Process-wide and idempotent. Returns False, changing nothing,
    where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def x86_bf16_units() -> list[str]:
    """The bf16 units torch's own CPUID probes find on this x86 CPU: AVX512-BF16, AMX (none elsewhere)."""
    probes = (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
    return [label for label, probe in probes if getattr(torch.cpu, probe, lambda: False)()]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: x86 AVX512-BF16 or AMX tiles, or Arm's bf16
    extension. Elsewhere oneDNN emulates bf16 with fp32 arithmetic plus conversions, so `--amp` would
    only slow a step down."""
    if x86_bf16_units():
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            return " bf16" in Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return False


def cpu_kind() -> str:
    """One line naming this CPU for benchmark output: model name, vendor, the vector ISA torch's
    kernels dispatch to, and the bf16 units. Speed-ups differ between CPU kinds (AMD with AVX-512 or
    AVX2, Intel with AVX-512 and AMX), so every figure is printed beside it."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())     # the first CPU's lines
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    vendor = info.get("vendor_id") or platform.machine()
    units = x86_bf16_units()
    return (f"{name} ({vendor}), {os.cpu_count()} logical CPUs, torch ISA "
            f"{torch.backends.cpu.get_cpu_capability()}, bf16 units: {', '.join(units) or 'none'}")


def amp_unavailable(device: torch.device) -> str | None:
    """Why `--amp` (bf16 autocast) would not pay on this device, or None if it runs there natively."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        return "this CPU has no native bf16 (AVX512-BF16, AMX or Arm bf16); emulated bf16 is slower than fp32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    if device.type not in ("cpu", "cuda"):
        return f"bf16 autocast is not used on {device.type}"
    return None
