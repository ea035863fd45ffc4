"""Tokenized prompts kept between runs, so a second run (and the learner after the launcher's preflight in
the same run) on the same data starts without templating and tokenizing every row again.

An entry is keyed by what the prompts depend on: each source file's path, size and modification time (and
content, for files under 1 MiB; a Hub dataset's by the files of its snapshot in the HF cache; a built-in task
by its name), the tokenizer (its vocabulary, merges, special
tokens and chat template) and the data.* options that shape a prompt. It holds the token ids (one int32
array with offsets), each prompt's fields (msgpack, validated as records' fields are) and the counts the run
reports. It is read with `numpy.load(allow_pickle=False)`: nothing in it can run code. The newest `KEEP`
entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from gkd_async.data.prompt import Prompt
from gkd_async.models.hub import HUB_ID, HubError, hub_snapshot
from gkd_async.transport.wire import is_field_value

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KEEP = 8
FORMAT_VERSION = 1


def cache_key(files: Sequence[str], tokenizer: PreTrainedTokenizerBase, options: Any) -> str | None:
    """The entry's name, or None when a source cannot be fingerprinted from the local disk."""
    digest = hashlib.sha256(repr((FORMAT_VERSION, options)).encode())
    for name in files:
        stats = _source_stats(name)
        if stats is None:
            return None
        digest.update(json.dumps(stats).encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def _source_stats(name: str) -> list | None:
    from gkd_async.data.rows import TASK_PREFIX

    if name.startswith(TASK_PREFIX):
        return [name]
    path = Path(name).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif any(c in name for c in "*?["):
        import glob

        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif HUB_ID.fullmatch(name.partition(":")[0]):
        return _hub_dataset_stats(name)
    else:
        return None
    return [_file_stat(p) for p in files]


def _hub_dataset_stats(name: str) -> list | None:
    """A Hub dataset id by its snapshot in the HF cache (a commit's files: what reading it reads), or None
    when it cannot be resolved here (reading it then says why)."""
    try:
        snapshot = hub_snapshot(name.partition(":")[0], "dataset")
    except HubError:
        return None
    return [name, *(_file_stat(p) for p in sorted(snapshot.rglob("*")) if p.is_file())]


def _file_stat(path: Path) -> list:
    """Path, size and modification time; small files (under 1 MiB) by their content too, since a rewrite of
    the same size can keep a coarse modification time."""
    stat = path.stat()
    content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.st_size < 2**20 else ""
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, content]


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = (tokenizer.all_special_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.chat_template)
    return hashlib.sha256((state + repr(specials)).encode()).hexdigest()


def _path(key: str) -> Path:
    from gkd_async.models.loading import cache_dir

    return cache_dir() / "prompts" / f"{key}.npz"


def read(key: str) -> tuple[list[Prompt], int, int] | None:
    """(prompts, rows read, prompts dropped as overlong) of the entry, or None when there is none (or it is
    not one this code wrote)."""
    path = _path(key)
    try:
        with np.load(path, allow_pickle=False) as entry:
            ids, offsets, packed, counts = entry["ids"], entry["offsets"], entry["extra"], entry["counts"]
        extras = msgpack.unpackb(packed.tobytes(), raw=False)
    except (OSError, KeyError, ValueError, msgpack.UnpackException):
        return None
    if len(extras) != len(offsets) - 1 or not all(isinstance(e, dict) and is_field_value(e, -1) for e in extras):
        return None
    os.utime(path)  # recently used: kept
    prompts = [Prompt(ids[a:b], extra) for a, b, extra in zip(offsets[:-1], offsets[1:], extras, strict=True)]
    return prompts, int(counts[0]), int(counts[1])


def write(key: str, prompts: Sequence[Prompt], rows: int, dropped: int) -> None:
    """Store an entry (atomically: written aside, then renamed), then drop all but the newest KEEP."""
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(p.ids) for p in prompts), np.int64, len(prompts))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([p.ids for p in prompts]).astype(np.int32) if prompts else np.zeros(0, np.int32)
    extra = np.frombuffer(msgpack.packb([p.extra for p in prompts], use_bin_type=True), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=ids, offsets=offsets, extra=extra, counts=np.array([rows, dropped], np.int64))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    entries = sorted(path.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)
    for old in entries[:-KEEP]:
        old.unlink(missing_ok=True)
