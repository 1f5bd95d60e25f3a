"""Where the shared real data sets live: ../shared/data from the project root (never copied here)."""

import os
from pathlib import Path


def shared_data() -> Path:
    """``$PREFIXTUNE_SHARED_DATA``, else the first ``shared/data`` above the tests, else /work/shared/data."""
    if os.environ.get("PREFIXTUNE_SHARED_DATA"):
        return Path(os.environ["PREFIXTUNE_SHARED_DATA"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "SOURCES.md").is_file():
            return parent / "shared" / "data"
    return Path("/work/shared/data")


E2E = shared_data() / "e2e"
