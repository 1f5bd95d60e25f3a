"""What this CPU multiplies fastest, measured once per machine and remembered (``--dtype auto``).

CPUs differ: with AVX-512 BF16 or AMX, bf16 matrix products run at several times fp32 (on a 2-core Xeon
with AMX, about 5×); with AVX2 only, bf16 is emulated and hundreds of times slower. ``auto`` measures
both on a decoding-sized product the first time it is asked on a machine, keeps bf16 only when it is
clearly faster (at least ``BF16_MARGIN`` ×), and remembers the answer in the cache folder, keyed by the
CPU's model and flags, the thread count and the PyTorch version. bf16 stays accurate for this use: the
frozen model runs in bf16 while the prefix is trained in fp32, and a bf16 base reaches the fp32 dev loss
within 2% (``tests/test_training.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

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


def cpu_dtype(cache_dir: Path | None = None) -> tuple[str, dict]:
    """``bf16`` or ``fp32`` for this CPU, and the rates that chose it (measured once, then read back)."""
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


def describe_choice(dtype: str, rates: dict) -> str:
    ratio = rates["bf16"] / max(rates["fp32"], 1e-9)
    return (
        f"--dtype auto: {dtype} on this CPU (bf16 matmul {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f}: "
        f"{ratio:.1f}×; bf16 is chosen from {BF16_MARGIN}×)"
    )
