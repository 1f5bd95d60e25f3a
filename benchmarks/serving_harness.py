"""What the serving benchmarks share: the real HTTP server (uvicorn) in this process, on loopback, and a
client that posts JSON to it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request


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
