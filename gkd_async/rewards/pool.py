"""RewardPool: the custom reward function called in processes of its own, so that a call that hangs past
`custom_reward_function.timeout_s` is killed rather than left running, and one that ends its process (a crash,
`os._exit`) fails its own group only.

Each process is `python -m gkd_async.rewards.pool PATH NAME`: it loads the function once and answers calls over
its stdin/stdout (pickled messages; the function's own prints go to stderr). A killed or dead process is
started again for the next call. The processes are the pool's own children: only the run's own reward code
runs in them, so the messages stay inside the run's trust boundary.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from gkd_async.rewards.loading import RewardError, compute_reward, load_reward_function

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # where the child imports gkd_async from
POLL_S = 0.5  # how often a waiting caller runs its `on_wait` (the worker's heartbeat)


class RewardProcess:
    """One child process serving the reward function; `start`ed lazily, killed on a timeout."""

    def __init__(self, path: str, name: str) -> None:
        self.path, self.name = path, name
        self.process: subprocess.Popen | None = None
        self.requests: Connection | None = None
        self.replies: Connection | None = None
        self.started_at = 0.0  # when the current call was sent

    def ensure_started(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gkd_async.rewards.pool", self.path, self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
            },
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.replies = Connection(os.dup(self.process.stdout.fileno()), writable=False)

    def send(self, prompt: str, response: str, extra: dict[str, Any]) -> None:
        self.ensure_started()
        assert self.requests is not None
        self.started_at = time.monotonic()
        with contextlib.suppress(OSError):  # died since: its reply is an end of file, which `receive` reports
            self.requests.send((prompt, response, extra))

    def receive(self) -> float:
        """The reply to the call in flight, which is ready (`replies.poll()` said so); RewardError when the
        function failed or its process ended."""
        assert self.replies is not None and self.process is not None
        try:
            ok, value = self.replies.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            self.stop()
            raise RewardError(
                f"the reward function {self.name}'s process ended (exit code {code}) during a call"
            ) from None
        if not ok:
            raise RewardError(value)
        return value

    def stop(self) -> None:
        """Kill the process, if any, and forget it: the next call starts a new one."""
        for conn in (self.requests, self.replies):
            if conn is not None:
                conn.close()
        self.requests = self.replies = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()
        self.process = None


class RewardPool:
    """`num_workers` reward processes; `score` hands a group's responses to them and waits for every reply, each
    call limited to `timeout_s`. The first failure (an error, a timeout, a process that died) fails the group,
    as RewardError, after the group's other calls are answered or killed."""

    def __init__(
        self, path: str, name: str, num_workers: int, timeout_s: float, on_wait: Callable[[], None] = lambda: None
    ) -> None:
        self.name, self.timeout_s, self.on_wait = name, timeout_s, on_wait
        self.processes = [RewardProcess(path, name) for _ in range(num_workers)]

    def score(self, prompt: str, responses: Sequence[str], extra: dict[str, Any]) -> np.ndarray:
        rewards = np.zeros(len(responses), dtype=np.float32)
        todo = list(enumerate(responses))
        busy: dict[RewardProcess, int] = {}  # process -> index of the response it is scoring
        failure: RewardError | None = None
        while todo or busy:
            for process in self.processes:
                if todo and failure is None and process not in busy:
                    index, response = todo.pop(0)
                    process.send(prompt, response, extra)
                    busy[process] = index
            if failure is not None:
                todo.clear()
            for process, index in list(busy.items()):
                assert process.replies is not None
                if process.replies.poll():
                    del busy[process]
                    try:
                        rewards[index] = process.receive()
                    except RewardError as err:
                        failure = failure or err
                elif time.monotonic() - process.started_at > self.timeout_s:
                    del busy[process]
                    process.stop()
                    failure = failure or RewardError(
                        f"the reward function {self.name} did not return within {self.timeout_s:g}s "
                        "(custom_reward_function.timeout_s); its process was killed"
                    )
            if busy:
                waiting = [p.replies for p in busy if p.replies is not None]
                soonest = min(p.started_at for p in busy) + self.timeout_s - time.monotonic()
                if not _wait_any(waiting, max(0.0, min(POLL_S, soonest))):
                    self.on_wait()
        if failure is not None:
            raise failure
        return rewards

    def close(self) -> None:
        for process in self.processes:
            process.stop()


def _wait_any(connections: list[Connection], timeout: float) -> bool:
    return bool(wait(connections, timeout))


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """End this process soon after the one that started it is gone (even by kill -9), in whatever call it is:
    a hung reward would otherwise outlive its worker. Polled, as the worker that started it may be a thread,
    and the kernel's parent-death signal follows the starting thread, not the process."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(path: str, name: str) -> None:
    """The child's loop: requests on stdin, replies on what was stdout; the function's prints go to stderr."""
    _exit_with_parent()
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = Connection(os.dup(0), writable=False)
    try:
        fn = load_reward_function(path, name)
    except RewardError as err:
        fn, load_error = None, str(err)
    while True:
        try:
            prompt, response, extra = requests.recv()
        except (EOFError, OSError):
            return
        if fn is None:
            replies.send((False, load_error))
            continue
        try:
            replies.send((True, compute_reward(fn, prompt, response, extra)))
        except RewardError as err:
            replies.send((False, str(err)))


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
