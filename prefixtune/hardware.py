"""What this CPU multiplies fastest (``--dtype auto``): detected from its instruction set, else measured once.

CPUs differ: with AVX-512 BF16 or AMX, bf16 matrix products run at several times fp32 (on a 2-core Xeon
with AMX, about 5×); with AVX2 only, bf16 is emulated and hundreds of times slower. Where the CPU's flags
can be read (Linux), ``auto`` takes bf16 exactly when they list ``amx_bf16`` or ``avx512_bf16``: a fixed
answer, unlike a timing, which another busy process can turn around (measured here: AMX bf16 fell from
891 to 40 GFLOP/s under load, below fp32). Elsewhere it measures both on a decoding-sized product once
and keeps bf16 only when it is at least ``BF16_MARGIN`` × as fast, remembering the answer in the cache
folder, keyed by the CPU, the thread count and the PyTorch version. bf16 stays accurate for this use: the
frozen model runs in bf16 while the prefix is trained in fp32, and a bf16 base reaches the fp32 dev loss
within 2% (``tests/test_training.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from .errors import PrefixTuneError

ENV = "PREFIXTUNE_CPU_DTYPE"
BF16_MARGIN = 1.5  # bf16 must be at least this much faster than fp32 to be chosen
CACHE_FILE = "cpu_dtype.json"


def cpu_key() -> str:
    """The CPU's model and flags, the thread count and the PyTorch version, as a short hash."""
    text = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        text = f"{model}|{flags}"
    except OSError:
        pass
    text += f"|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def matmul_rate(dtype: torch.dtype, rows: int = 64, size: int = 768, seconds: float = 0.3) -> float:
    """FLOP/s of a (rows × size) · (size × 2·size) product in ``dtype`` on this CPU."""
    a, b = torch.randn(rows, size, dtype=dtype), torch.randn(size, 2 * size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * rows * size * 2 * size * count / (time.perf_counter() - start)


BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in info.splitlines() if line.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def cpu_dtype(cache_dir: Path | None = None) -> tuple[str, str]:
    """``bf16`` or ``fp32`` for this CPU, and why. ``PREFIXTUNE_CPU_DTYPE`` (fp32 or bf16) decides instead,
    for results that do not depend on the machine (the test suite sets fp32)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise PrefixTuneError(f"{ENV} must be fp32 or bf16, got {forced!r}")
        return forced, f"{ENV}={forced}"
    flags = cpu_flags()
    if flags is not None:
        found = [f for f in BF16_FLAGS if f in flags]
        if found:
            return "bf16", f"this CPU has bf16 matrix instructions ({', '.join(found)})"
        return "fp32", "this CPU has no bf16 matrix instructions (AMX, AVX-512 BF16)"
    dtype, rates = measured_dtype(cache_dir)
    ratio = rates["bf16"] / max(rates["fp32"], 1e-9)
    return dtype, f"bf16 matmul measured at {ratio:.1f}× fp32 on this CPU (bf16 from {BF16_MARGIN}×)"


def measured_dtype(cache_dir: Path | None = None) -> tuple[str, dict]:
    """``bf16`` or ``fp32`` by timing both (once per machine, then read back), and the rates in GFLOP/s."""
    from .base import default_cache_dir

    file = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    key = cpu_key()
    known = {}
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        pass
    entry = known.get(key) if isinstance(known, dict) else None
    if not isinstance(entry, dict) or entry.get("dtype") not in ("bf16", "fp32"):
        rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
        dtype = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"
        entry = {"dtype": dtype, "gflop_s": {k: round(v / 1e9, 1) for k, v in rates.items()}}
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: entry}, indent=1))
        except OSError:
            pass  # a read-only cache: measure again next time
    return entry["dtype"], entry["gflop_s"]
