"""The `collective` weight transport: learner rank 0 sends each version straight to every rollout worker.

Each rollout worker joins learner rank 0 in a torch.distributed group of two (gloo over TCP on CPUs, NCCL
on GPUs with `pipeline.weight_collective_backend=nccl`), met through a TCPStore that rank 0 serves on its
node address, announced in Redis. The learner groups its streamed tensors into buckets of about
`pipeline.weight_bucket_mb` and sends each bucket (a description, then each tensor's bytes as they are, no
packing copy) to every worker before gathering the next, so its extra device memory is a bucket and
nothing is written to Redis, the object store or a disk.

A group of two per worker, rather than one broadcast group of fixed size as in verl or NeMo-RL, is what lets
workers join and leave at any time: a worker started later with `gkd-async worker rollout` registers,
rank 0 connects it in a background thread and sends it the newest version at once (rank 0 keeps that
version in host memory for this, as the redis and ray transports keep it in Redis or the object store),
and a worker that dies costs one failed send, after which rank 0 forgets it. Rank 0 sends to the workers
one after another: the learner's cost of a version grows with the number of workers.

Only a peer that can read the run's Redis is paired: rank 0 keeps a random secret there, challenges each
registration (HMAC-SHA256 of the slot and a nonce, answered within HANDSHAKE_S, several at once), and the
store keys a pair meets under are derived from the secret, so a stranger on the store cannot join a pair.

Redis still announces each version number once every connected worker has it (for `gkd-async inspect`);
a worker loads what it received, never a path or key read from Redis, and a bucket holds nothing but
tensors (names, dtypes and shapes in JSON), so loading weights can never run code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from datetime import timedelta

import redis
import structlog
import torch
import torch.distributed as dist

from gkd_async.errors import GKDError
from gkd_async.transport.network import listening_store, node_address, redis_host
from gkd_async.transport.redis_client import raises_unavailable
from gkd_async.weight_sync.buckets import iter_buckets, unshared

_END = 0  # a header whose metadata length is 0 ends a version; its last field is the bucket count
HANDSHAKE_S = 10.0  # a registered peer proves it holds the run's secret within this, or is dropped
MAX_PENDING = 8  # handshakes in flight at once; registrations beyond the newest MAX_BURST are dropped
MAX_BURST = 64
MAX_META_BYTES = 4 * 2**20  # a bucket's description: names, dtypes and shapes


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def _pair_prefix(secret: bytes, slot: int) -> str:
    """The store keys a pair meets under: derived from the run's secret, so a stranger on the store cannot
    write into another pair's meeting (gloo exchanges its addresses there)."""
    return "pair-" + _mac(secret, f"pair:{slot}")[:32]


def describe_bucket(bucket: Mapping[str, torch.Tensor]) -> bytes:
    """What a receiver needs to allocate a bucket's tensors: name, dtype and shape of each, as JSON."""
    entries = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in bucket.items()]
    return json.dumps(entries).encode()


def allocate_bucket(
    meta: bytes, device: torch.device | str = "cpu", expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """Empty tensors as `describe_bucket` described them, to receive into. Refuses anything else, and with
    `expected` (the model's names and shapes) any name or shape the model does not have, before allocating."""
    out: dict[str, torch.Tensor] = {}
    entries = json.loads(meta)
    if not isinstance(entries, list):
        raise ValueError("weights bucket: the description is not a list")
    for entry in entries:
        name, dtype_name, shape = entry if isinstance(entry, list) and len(entry) == 3 else (None, None, None)
        dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
        if not isinstance(name, str) or not isinstance(dtype, torch.dtype):
            raise ValueError(f"weights bucket: {entry!r} is not a tensor's name, dtype and shape")
        sizes = shape if isinstance(shape, list) else [None]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sizes):
            raise ValueError(f"weights bucket: tensor {name!r} has the shape {shape!r}")
        if expected is not None and tuple(shape) != expected.get(name):
            raise ValueError(f"weights bucket: tensor {name!r} of shape {shape!r} is not one of the model's")
        out[name] = torch.empty(shape, dtype=dtype, device=device)
    return out


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


class _Pairs:
    """Learner rank 0's side: the TCPStore workers meet it through, and a group of two per connected worker."""

    def __init__(self, client: redis.Redis, key: str, backend: str, timeout: timedelta) -> None:
        self.backend, self.timeout = backend, timeout
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.host = node_address(toward=redis_host(client))
        self.store = listening_store(self.host, timeout)
        self.secret = secrets.token_bytes(32)  # in the run's Redis only: a peer proves it can read that
        self.groups: dict[int, dist.ProcessGroup] = {}
        self.handshakes = threading.BoundedSemaphore(MAX_PENDING)
        self.newest: tuple[int, list[tuple[bytes, dict[str, torch.Tensor]]]] | None = None  # for late workers
        self.lock = threading.Lock()
        self.log = structlog.get_logger("gkd_async.weight_sync")
        self._stop = threading.Event()
        self._accepted = 0
        address = {"host": self.store.host, "port": self.store.port}
        client.set(f"{key}:collective:secret", self.secret.hex())
        client.set(f"{key}:collective", json.dumps(address))
        self._acceptor = threading.Thread(target=self._accept, name="weights-acceptor", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        """Each registration handed to a handshake of its own (at most MAX_PENDING at once, each bounded by
        HANDSHAKE_S), so a peer that registers and goes silent holds up nobody."""
        while not self._stop.wait(0.1):
            registered = self.store.add("slots", 0)
            if registered - self._accepted > MAX_BURST:  # a flood of registrations: only the newest count
                self.log.warning("weights: registrations dropped", count=registered - MAX_BURST - self._accepted)
                self._accepted = registered - MAX_BURST
            while self._accepted < registered and not self._stop.is_set():
                if not self.handshakes.acquire(timeout=0.1):
                    continue
                slot, self._accepted = self._accepted, self._accepted + 1
                threading.Thread(target=self._admit, args=(slot,), name=f"weights-admit-{slot}", daemon=True).start()

    def _admit(self, slot: int) -> None:
        """Challenge the peer of `slot`; pair with it and send it the newest version if it answers with the
        run's secret."""
        try:
            nonce = secrets.token_hex(16)
            self.store.set(f"challenge{slot}", nonce)
            try:
                self.store.wait([f"proof{slot}"], timedelta(seconds=HANDSHAKE_S))
                proof = self.store.get(f"proof{slot}").decode(errors="replace")
            except Exception:  # noqa: BLE001 (the store's timeout has no type of its own)
                self.log.warning("weights: a peer registered and did not answer the challenge", slot=slot)
                return
            if not hmac.compare_digest(proof, _mac(self.secret, f"{slot}:{nonce}")):
                self.log.warning("weights: a peer without the run's secret was refused", slot=slot)
                return
            try:
                group = _pair(self.store, slot, 0, self.backend, self.timeout, self.host, self.secret)
            except Exception as exc:  # the worker left before meeting us: nothing to send it
                self.log.warning("weights: a rollout worker registered but never connected", error=repr(exc))
                return
            with self.lock:
                if self.newest is not None and not self._send_version(group, *self.newest):
                    return
                self.groups[slot] = group
        finally:
            self.handshakes.release()

    def publish(self, pairs: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int) -> int:
        """Each bucket to every connected worker before the next is gathered; the tensors themselves (fresh
        host copies from the learner's gather) are what is kept for workers that connect later."""
        with self.lock:
            self.newest, kept, written = None, [], 0
            for bucket in iter_buckets(pairs, bucket_bytes):
                meta = describe_bucket(bucket)
                for slot, group in list(self.groups.items()):
                    if not self._send(group, version, meta, bucket):
                        del self.groups[slot]
                kept.append((meta, {name: t.cpu() for name, t in bucket.items()}))
                written += sum(t.numel() * t.element_size() for t in bucket.values())
            for slot, group in list(self.groups.items()):
                if not self._send(group, version, b"", len(kept)):
                    del self.groups[slot]
            self.newest = (version, kept)
            return written

    def _send_version(self, group, version: int, buckets: list[tuple[bytes, dict[str, torch.Tensor]]]) -> bool:
        for meta, bucket in buckets:
            if not self._send(group, version, meta, bucket):
                return False
        return self._send(group, version, b"", len(buckets))

    def _send(self, group, version: int, meta: bytes, bucket: dict[str, torch.Tensor] | int) -> bool:
        """One bucket: a header (version, description bytes, tensor count), the description, each tensor's
        bytes; or, with no description, the header that ends a version, `bucket` its bucket count. False (and
        the worker forgotten by the caller) when the worker is gone or does not read within the timeout."""
        count = bucket if isinstance(bucket, int) else len(bucket)
        header = torch.tensor([version, len(meta), count], dtype=torch.int64, device=self.device)
        try:
            group.send([header], 1, 0).wait()
            if meta:
                group.send([torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(self.device)], 1, 0).wait()
                for tensor in bucket.values():
                    if tensor.numel():
                        group.send([_bytes_of(tensor.to(self.device))], 1, 0).wait()
        except Exception as exc:
            self.log.warning("weights: a rollout worker stopped receiving; it is dropped", error=repr(exc))
            return False
        return True

    def close(self) -> None:
        """Stop accepting and drop every connection: the workers' receivers see the learner leave."""
        self._stop.set()
        self._acceptor.join(timeout=5)
        with self.lock:
            self.groups.clear()
            self.newest = None


class _Receiver:
    """A rollout worker's side: a background thread that keeps the newest version received from rank 0."""

    def __init__(self, client: redis.Redis, key: str, backend: str, timeout: timedelta) -> None:
        self.client, self.key, self.backend, self.timeout = client, key, backend, timeout
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.newest: tuple[int, dict[str, torch.Tensor]] | None = None
        self.expected: Mapping[str, tuple[int, ...]] | None = None  # the model's names and shapes, once known
        self.lock = threading.Lock()
        self.log = structlog.get_logger("gkd_async.weight_sync")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-receiver", daemon=True)
        self._thread.start()

    def _address(self) -> dict | None:
        """Rank 0's store address and the run's secret, as rank 0 announced them in Redis."""
        try:
            raw, secret = self.client.mget(f"{self.key}:collective", f"{self.key}:collective:secret")
            address = json.loads(raw) if raw else None
            address["secret"] = bytes.fromhex(secret.decode())
        except (redis.RedisError, ValueError, TypeError, AttributeError):
            return None
        if not {"host", "port", "secret"} <= address.keys():
            return None
        return address

    def _run(self) -> None:
        while not self._stop.is_set():
            address = self._address()
            if address is None:
                self._stop.wait(0.2)
                continue
            try:
                store = dist.TCPStore(
                    str(address["host"]), int(address["port"]), is_master=False, timeout=timedelta(seconds=10)
                )
                host = node_address(toward=str(address["host"]))
                slot = store.add("slots", 1) - 1
                challenge = store.get(f"challenge{slot}").decode()  # waits (10 s at most) for rank 0's
                store.set(f"proof{slot}", _mac(address["secret"], f"{slot}:{challenge}"))
                group = _pair(store, slot, 1, self.backend, self.timeout, host, address["secret"])
            except Exception as exc:  # rank 0 gone or not reachable: wait for the next announcement
                shown = {"host": address["host"], "port": address["port"]}
                self.log.warning("weights: cannot reach learner rank 0", address=shown, error=repr(exc))
                self._stop.wait(1.0)
                continue
            try:
                self._receive(group)
            except Exception as exc:
                self.log.warning("weights: the learner's connection broke; reconnecting", error=repr(exc))
            self._stop.wait(0.2)

    def _receive(self, group) -> None:
        """Versions as they come, until the connection breaks: the learner left (a restarted one announces
        itself anew), or sent nothing within the timeout (rank 0 then sends the newest again on reconnection)."""
        building: dict[str, torch.Tensor] = {}
        buckets, version = 0, None
        while not self._stop.is_set():
            header = torch.empty(3, dtype=torch.int64, device=self.device)
            group.recv([header], 0, 0).wait()
            got, meta_len, count = (int(v) for v in header.tolist())
            if got != version:
                building, buckets, version = {}, 0, got
            if meta_len == _END:
                if count == buckets:
                    with self.lock:
                        self.newest = (got, building)
                building, buckets, version = {}, 0, None
                continue
            if not 0 < meta_len <= MAX_META_BYTES:
                raise ValueError(f"weights bucket: a description of {meta_len} bytes (at most {MAX_META_BYTES})")
            meta = torch.empty(meta_len, dtype=torch.uint8, device=self.device)
            group.recv([meta], 0, 0).wait()
            bucket = allocate_bucket(bytes(meta.cpu().numpy()), self.device, self.expected)
            if len(bucket) != count:
                raise ValueError(f"weights bucket: {len(bucket)} tensors described, {count} announced")
            for tensor in bucket.values():
                if tensor.numel():
                    group.recv([_bytes_of(tensor)], 0, 0).wait()
            building.update(bucket)
            buckets += 1

    def close(self) -> None:
        self._stop.set()


def _pair(store, slot: int, rank: int, backend: str, timeout: timedelta, host: str, secret: bytes):
    """The group of two of `slot`; gloo listens on `host` (this node's address as the other end reaches it),
    or on the interface GLOO_SOCKET_IFNAME names."""
    prefixed = dist.PrefixStore(_pair_prefix(secret, slot), store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(prefixed, rank, 2, options)


class CollectiveWeights:
    """The transport, as both of its ends see it: the learner publishes, a rollout worker reads."""

    needs_shared_directory = False

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        url: str = "redis",
        bucket_mb: float = 64.0,
        backend: str = "gloo",
        timeout_s: float = 600.0,
    ) -> None:
        if backend == "nccl" and not torch.cuda.is_available():
            raise GKDError(
                "pipeline.weight_collective_backend=nccl needs a GPU on the learner and on every rollout worker, "
                "and this process has none; use pipeline.weight_collective_backend=gloo"
            )
        self.client, self.key, self.url, self.backend = client, key, url, backend
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.timeout = timedelta(seconds=timeout_s)
        self._pairs: _Pairs | None = None
        self._receiver: _Receiver | None = None

    @raises_unavailable
    def publish(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Send `tensors` as `version` to every connected worker, then announce it; returns the bytes sent to
        each worker. The tensors are kept (not copied) for workers that connect later, so the caller must not
        change them afterwards: the learner's gathers are fresh host copies."""
        self.serve()
        pairs = unshared(tensors).items() if isinstance(tensors, Mapping) else tensors
        written = self._pairs.publish(pairs, version, self.bucket_bytes)
        announcement = {"version": version, "transport": "collective", "bytes": written}
        self.client.set(self.key, json.dumps(announcement | {"workers": self.connected_workers}))
        return written

    def serve(self) -> None:
        """Learner rank 0: open for workers (the first publish does it too)."""
        if self._pairs is None:
            self._pairs = _Pairs(self.client, self.key, self.backend, self.timeout)

    @property
    def connected_workers(self) -> int:
        return 0 if self._pairs is None else len(self._pairs.groups)

    def expect(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """A rollout worker: refuse any tensor that is not one of these (the model's names and shapes) before
        allocating it."""
        self._receiving().expected = dict(shapes)

    def _receiving(self) -> _Receiver:
        if self._receiver is None:
            self._receiver = _Receiver(self.client, self.key, self.backend, self.timeout)
        return self._receiver

    def latest(self) -> tuple[int, int] | None:
        """The newest version this worker has received in full (twice: the version is its own handle)."""
        self._receiving()
        with self._receiver.lock:
            newest = self._receiver.newest
        return None if newest is None else (newest[0], newest[0])

    def read(self, version: int) -> dict[str, torch.Tensor] | None:
        """The state dict of `version` if it is still the newest received; None when a newer one came."""
        if self._receiver is None:
            return None
        with self._receiver.lock:
            newest = self._receiver.newest
        return newest[1] if newest is not None and newest[0] == version else None

    def close(self) -> None:
        for end in (self._pairs, self._receiver):
            if end is not None:
                end.close()
