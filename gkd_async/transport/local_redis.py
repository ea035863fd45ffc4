"""A private redis-server for one run (or one test session): a Unix socket in a directory only this user
can enter (no TCP port: nothing else on the machine can connect, or bind the address first and pose as it),
a random password, no persistence, stopped by pid when the run ends, and by the kernel when the process that
started it dies. A port on loopback instead where one is asked for (`port=` or `tcp=True`).

The password goes to the server in a config file that only this user can read, never on its command line
(where `ps` and /proc/*/cmdline show it to every user of the machine)."""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import redis

from gkd_async.errors import RedisServerNotFoundError, RedisUnavailableError

INSTALL_HINT = (
    "redis-server is not installed. Install it (Debian/Ubuntu: 'sudo apt-get install redis-server', "
    "macOS: 'brew install redis'), or set pipeline.redis_url to a Redis server you already run."
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalRedisServer:
    """Start with `start()` or as a context manager; `url` carries the password."""

    def __init__(
        self, port: int | None = None, password: str | None = None, start_timeout_s: float = 10.0, tcp: bool = False
    ) -> None:
        self.port = port
        self.tcp = tcp or port is not None
        self.password = password if password is not None else secrets.token_hex(16)
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None

    @property
    def socket_path(self) -> Path | None:
        return None if self.tcp or self._dir is None else self._dir / "redis.sock"

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tcp:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"unix://{auth}{self.socket_path}?db=0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}" if self.tcp else str(self.socket_path)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> LocalRedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerNotFoundError(INSTALL_HINT)
        self._dir = Path(tempfile.mkdtemp(prefix="gkd-redis-"))  # 0700: the socket's only way in
        fixed_port = self.port is not None or not self.tcp
        for _attempt in range(1 if fixed_port else 3):
            if not fixed_port:
                self.port = free_port()
            if self._spawn(binary):
                atexit.register(self.stop)
                return self
        log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RedisUnavailableError(f"redis-server did not start on {self.address}; its log ends:\n{log}")

    def _spawn(self, binary: str) -> bool:
        assert self._dir is not None
        if self.tcp:
            listen = [f"port {self.port}", "bind 127.0.0.1"]
        else:
            listen = ["port 0", f'unixsocket "{self.socket_path}"', "unixsocketperm 700"]
        lines = [
            *listen,
            'save ""',
            "appendonly no",
            f'dir "{self._dir}"',
            f'logfile "{self._dir / "redis.log"}"',
            "daemonize no",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = self._dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            # The kernel ties the signal to the starting thread: only the main thread lives as long as we do.
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                client.ping()
                return True
            except redis.RedisError:
                time.sleep(0.02)
            finally:
                client.close()
        self._proc.kill()
        self._proc.wait()
        return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
