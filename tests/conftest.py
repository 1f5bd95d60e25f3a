import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# ``--dtype auto`` takes bf16 on CPUs with AMX or AVX-512 BF16 and fp32 elsewhere; the machines that run the
# suite differ, and tests compare numbers (one process against two, the CLI against the Python API), so the
# suite pins fp32. tests/test_distributed.py checks the detection itself with the variable removed.
os.environ.setdefault("PREFIXTUNE_CPU_DTYPE", "fp32")
