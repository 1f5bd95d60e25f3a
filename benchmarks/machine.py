"""This machine's limits, measured the same way by every benchmark, on the CPU or a GPU.

- :func:`copy_bandwidth`: bytes/s of a large copy (read + write counted, as STREAM's copy);
- :func:`matmul_rate`: FLOP/s of an n×n product in a dtype;
- :func:`spec_peak`: the maker's dense bf16/fp16 peak of a known GPU, the denominator of MFU;
- :func:`sync` and :func:`peak_memory_mb`, so a timing or a memory figure means the same on either.

Each measurement is the best of ``repeats`` (a shared machine has slow moments; a floor must not drop
with them).
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the makers' data sheets; the first name found in
# the device's name counts (so "H100 PCIe" before "H100", the SXM part).
GPU_PEAKS_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05))


def sync(device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; the CPU needs nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu") -> float:
    """Seconds of one call of ``fn``, its device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device="cpu", megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large fp32 copy on ``device`` (read + write counted), best of ``repeats``."""
    a = torch.ones(megabytes * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(timed(lambda: b.copy_(a), device) for _ in range(repeats))
    return 2 * a.numel() * 4 / best


def matmul_rate(dtype: torch.dtype = torch.float32, device="cpu", n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an n×n product in ``dtype`` on ``device`` (n: 2048 on the CPU, 8192 on a GPU), best of
    ``repeats`` (on a GPU each of ten products in a row, so launch gaps do not count)."""
    gpu = torch.device(device).type == "cuda"
    n = n or (8192 if gpu else 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    calls = 10 if gpu else 1

    def products():
        for _ in range(calls):
            a @ b

    products()
    best = min(timed(products, device) for _ in range(repeats))
    return 2 * n**3 * calls / best


def spec_peak(device) -> float | None:
    """The maker's dense bf16 peak (FLOP/s) of this GPU where its name is known, else None (and on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in GPU_PEAKS_TFLOPS if key in name), None)


def peak_memory_mb(device) -> float | None:
    """The most GPU memory PyTorch held on ``device`` so far, MiB; None on the CPU (read peak RSS there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
