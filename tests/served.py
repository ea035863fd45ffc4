"""A real `vllm serve` of a tiny local model on loopback, and a TCP relay in front of it that a test can
cut, to make the server look dead (connections reset) or hung (connections accepted, never answered)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from gkd_async.models.loading import resolve_model_path
from gkd_async.transport.local_redis import free_port

SERVED_NAME = "tiny-teacher"


@contextlib.contextmanager
def vllm_server(
    model_spec: str, max_logprobs: int, max_model_len: int, log_path, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    """Yields the server's API root (http://127.0.0.1:PORT/v1) once it answers; stops it afterwards. `extra`: more
    arguments for `vllm serve` (benchmarks/bench_vllm_prefix.py --served: its prefix caching on or off)."""
    port = free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(resolve_model_path(model_spec)), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs),
        "--kv-cache-memory-bytes", str(32 << 20), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CONFIGURE_LOGGING": "0"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}: {Path(log_path).read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not answer in 240 s: {Path(log_path).read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def prompt_tokens_served(base_url: str) -> float:
    """The server's own count of prompt tokens it has processed (its Prometheus metrics)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:prompt_tokens_total{")
    )


class Relay:
    """Forwards loopback TCP connections to `target_port`; `mode` "up", "reset" (every connection is closed
    at once, as by a dead server) or "hang" (connections are accepted and never answered)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "up"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set(self, mode: str) -> None:
        """Change the mode; connections already relayed are cut, as a server going away would cut them."""
        with self.lock:
            self.mode = mode
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.open.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                mode = self.mode
                if mode == "reset":
                    client.close()
                    continue
                self.open.append(client)
                if mode == "hang":
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                self.open.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        self.set("reset")
