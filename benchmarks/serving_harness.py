"""What the serving benchmarks share: the real HTTP server (uvicorn) in this process, on loopback, and a
client that posts JSON to it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


class LiveServer:
    """``app`` served by uvicorn on a free loopback port, in a background thread, until :meth:`stop`."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def post(self, path: str, body: dict, headers: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
        """POST ``body`` as JSON; returns (status, decoded JSON answer), error statuses included."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def add_common_flags(ap, output: str) -> None:
    """--model, --data and --output (benchmarks/results/OUTPUT), as every serving benchmark takes them."""
    ap.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DATA), help="E2E data folder (default: ../shared/data/e2e)")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / output))


def model_with_prefixes(model_name, count: int, tokens: int, tag: str):
    """The base model (seed 0) and ``count`` random ``tokens``-token prefixes saved as folders task0… of a new
    temporary directory (none resident): (model, tokenizer, names, directory)."""
    import tempfile

    import torch

    from prefixtune import PrefixConfig, PrefixTunedModel, load_base

    torch.manual_seed(0)
    base, tokenizer = load_base(model_name)
    model = PrefixTunedModel(base, tokenizer)
    names = [f"task{i}" for i in range(count)]
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{tag}-"))
    for name in names:
        model.add_prefix(name, PrefixConfig(num_virtual_tokens=tokens, init_std=0.5))
        model.save_prefix(directory / name, name=name)
        model.remove_prefix(name)
    return model, tokenizer, names, directory


def e2e_sources(data) -> list[str]:
    """The unique E2E test inputs (meaning representations)."""
    from prefixtune.data import group_references, load_examples

    return [source for source, _ in group_references(load_examples("e2e", data, "test"))]
