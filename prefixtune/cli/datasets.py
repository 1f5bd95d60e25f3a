"""``prefixtune data download``: fetch the paper's data sets into a local data root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..download import DOWNLOADABLE


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "data", help="download the paper's data sets", description="Manage local copies of the paper's data sets."
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = actions.add_parser(
        "download",
        help="fetch a data set from its official release, checked by SHA-256",
        description="Fetch E2E, WebNLG 2017 or DART from the official release location into "
        "--to (default: $PREFIXTUNE_DATA, else ~/.cache/prefixtune/data), checking every file's "
        "SHA-256. Needs network access.",
    )
    d.add_argument("task", choices=DOWNLOADABLE, help="which data set")
    d.add_argument(
        "--to", default=None, help="data root to fill (default: $PREFIXTUNE_DATA or ~/.cache/prefixtune/data)"
    )
    d.add_argument("--base-url", default=None, help="download from this mirror instead of the official location")
    d.set_defaults(func=run)


def run(args) -> int:
    from ..download import download

    root = Path(args.to or os.environ.get("PREFIXTUNE_DATA") or Path.home() / ".cache" / "prefixtune" / "data")
    folder = download(args.task, root, args.base_url, progress=lambda p: print(f"fetched {p}", file=sys.stderr))
    print(f"{args.task}: {folder} (use --data {folder} or PREFIXTUNE_DATA={root})", file=sys.stderr)
    return 0
