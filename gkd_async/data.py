"""Prompts for the coordinator: JSONL files (or a built-in synthetic task), tokenized once, and a
resumable shuffled cursor over them."""

from __future__ import annotations

import glob
import json
import os
import random
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from gkd_async import prompt_cache
from gkd_async.config import DataSection
from gkd_async.cross_tokenizer import PROMPT_FIELD, prompt_source
from gkd_async.errors import GKDError
from gkd_async.hub import HubError, hub_snapshot
from gkd_async.records import FieldValue, is_field_value
from gkd_async.tasks import TASKS, task_rows

TASK_PREFIX = "tiny:"


class DataError(GKDError):
    """A data file is missing or one of its rows is malformed."""


@dataclass
class Prompt:
    ids: np.ndarray
    extra: dict[str, FieldValue] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptFormat:
    """How a data row becomes prompt tokens: the data.* options that shape it."""

    prompt_key: str = "prompt"
    max_prompt_length: int = 256
    filter_overlong: bool = True  # as data.filter_overlong_prompts
    apply_chat_template: bool = True
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, data: DataSection) -> PromptFormat:
        return cls(
            data.prompt_key,
            data.max_prompt_length,
            data.filter_overlong_prompts,
            data.apply_chat_template,
            data.system_prompt,
            dict(data.chat_template_kwargs),
        )


def load_prompts(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    data: DataSection | PromptFormat | None = None,
    keep_source: bool = False,
    report: Callable[[str], None] | None = None,
) -> list[Prompt]:
    """The prompts of `files`, tokenized; with `keep_source`, each also carries its messages or prompt string
    (`gkd_prompt`), for a teacher of another tokenizer to template and tokenize its own way. Prompts over
    data.max_prompt_length are dropped and counted (`report` gets the count) with data.filter_overlong_prompts,
    else refused naming the first."""
    fmt = data if isinstance(data, PromptFormat) else PromptFormat.of(data or DataSection())
    if not files:
        raise DataError("data.train_files is empty; give data files or a built-in task such as tiny:addition")
    key = prompt_cache.cache_key(files, tokenizer, (fmt, keep_source))
    cached = prompt_cache.read(key) if key else None
    if cached is not None:
        prompts, rows, overlong = cached
    else:
        workers = tokenize_workers(data.tokenize_workers if isinstance(data, DataSection) else 0)
        prompts, rows, overlong = _tokenize_all(files, tokenizer, fmt, keep_source, workers)
        if key and prompts:
            prompt_cache.write(key, prompts, rows, overlong)
    if overlong and report is not None:
        report(
            f"dropped {overlong:,} of {rows:,} prompts over {fmt.max_prompt_length:,} tokens "
            "(data.max_prompt_length; data.filter_overlong_prompts=false refuses them instead)"
        )
    if not prompts:
        why = f": all {rows:,} are over data.max_prompt_length={fmt.max_prompt_length}" if overlong else ""
        raise DataError(f"data files {files} hold no prompts{why}")
    return prompts


ENCODE_BATCH_ROWS = 1024  # rows templated, then tokenized in one call
POOL_AFTER_ROWS = 20_000  # worker processes start seconds late (each imports transformers): worth it past this
Batch = list[tuple[str, dict[str, Any]]]
Tokenized = tuple[list[Prompt], int]  # a batch's prompts, and how many of its rows were dropped as overlong


def tokenize_workers(requested: int | None) -> int:
    """Worker processes for a first tokenization, besides this one: `data.tokenize_workers`, or one per core
    but the one this process works on, at most 8."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def _tokenize_all(
    files: list[str], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, keep_source: bool, workers: int = 0
) -> tuple[list[Prompt], int, int]:
    """(prompts, rows read, prompts dropped as overlong). Rows go ENCODE_BATCH_ROWS at a time to
    `_tokenize_batch`. Past POOL_AFTER_ROWS rows, `workers` processes (spawned, each with a copy of the
    tokenizer) take batches too, up to two each in flight; this process reads the rows and takes the batches
    they have no room for, so a pool still starting costs nothing. Results are taken in row order: the
    prompts and the first error are those of one process."""
    prompts, overlong, rows = [], 0, 0
    pool: ProcessPoolExecutor | None = None
    pending: deque[Future | Tokenized] = deque()  # in row order: a worker's batch, or one done here

    def take_ready(wait: bool = False) -> None:
        nonlocal overlong
        while pending and (wait or not isinstance(pending[0], Future) or pending[0].done()):
            item = pending.popleft()
            batch_prompts, dropped = item.result() if isinstance(item, Future) else item
            prompts.extend(batch_prompts)
            overlong += dropped

    try:
        for batch in _row_batches(files):
            rows += len(batch)
            if pool is None and workers > 0 and rows > POOL_AFTER_ROWS:
                pool = ProcessPoolExecutor(
                    workers, get_context("spawn"), initializer=_start_worker, initargs=(tokenizer, fmt, keep_source)
                )
            in_flight = sum(isinstance(item, Future) and not item.done() for item in pending)
            if pool is not None and in_flight < 2 * workers:
                pending.append(pool.submit(_tokenize_in_worker, batch))
            else:
                pending.append(_tokenize_batch(batch, tokenizer, fmt, keep_source))
            take_ready()
        take_ready(wait=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return prompts, rows, overlong


def _row_batches(files: list[str]) -> Iterator[Batch]:
    batch = []
    for name in files:
        for item in iter_rows(name):
            batch.append(item)
            if len(batch) == ENCODE_BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _tokenize_batch(
    batch: Batch, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, keep_source: bool
) -> Tokenized:
    """The prompts of a batch of rows (templated one by one, tokenized in one call) and how many were dropped
    as overlong."""
    texts = [_prompt_text(row, where, tokenizer, fmt) for where, row in batch]
    prompts, overlong = [], 0
    for (where, row), ids in zip(batch, encode_texts(tokenizer, texts), strict=True):
        prompt = _prompt_of(ids, row, where, fmt)
        if prompt is None:
            overlong += 1
            continue
        if keep_source:
            prompt.extra[PROMPT_FIELD] = prompt_source(*_prompt_parts(row, fmt, where))
        prompts.append(prompt)
    return prompts, overlong


_WORKER: tuple[PreTrainedTokenizerBase, PromptFormat, bool] | None = None  # a tokenize worker's settings


def _start_worker(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, keep_source: bool) -> None:
    global _WORKER
    _WORKER = (tokenizer, fmt, keep_source)


def _tokenize_in_worker(batch: Batch) -> Tokenized:
    assert _WORKER is not None
    return _tokenize_batch(batch, *_WORKER)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens added: a fast tokenizer encodes the lot in one call
    into its Rust encoder (the ids `tokenizer(text)` gives, in 0.7x the time at Qwen's vocabulary); any other
    tokenizer a text at a time."""
    if getattr(tokenizer, "is_fast", False) and texts:
        return [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# ORG/NAME with an optional @REVISION and :SPLIT.
HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?(:[\w.-]+)?")


def iter_rows(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a data source: `where` names the file and row for error messages."""
    if name.startswith(TASK_PREFIX):
        task = name[len(TASK_PREFIX) :]
        if task not in TASKS:
            raise DataError(f"unknown built-in task {name!r}; available: {', '.join(TASK_PREFIX + t for t in TASKS)}")
        for i, row in enumerate(task_rows(task)):
            yield f"{name} row {i}", row
        return
    path = Path(name).expanduser()
    if any(c in name for c in "*?[") and not path.exists():
        matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"data pattern {name} matches no file")
        for match in matches:
            yield from _file_rows(Path(match))
        return
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "state.json").is_file()
            or (path / "dataset_dict.json").is_file()
        ):
            yield from _saved_dataset_rows(path)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(
                f"data directory {name} holds no {', '.join(DATA_SUFFIXES)} file and is no save_to_disk dataset"
            )
        for file in files:
            yield from _file_rows(file)
        return
    if path.is_file():
        yield from _file_rows(path)
        return
    if HUB_DATASET.fullmatch(name) and path.suffix not in DATA_SUFFIXES:  # data/train.jsonl is a missing file
        yield from _hub_dataset_rows(name)
        return
    raise DataError(f"data file {name} does not exist (data.train_files)")


def _file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".json":
        yield from _json_rows(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        raise DataError(
            f"data file {path} is not a format gkd-async reads ({path.suffix or 'no suffix'}); give .jsonl, .json or "
            ".parquet files, a directory of them, a datasets save_to_disk directory or a Hub dataset id"
        )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text: is it a JSONL file?") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{number}", row


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON array of row objects (or JSON lines under a .json name, as `datasets` also writes them)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text: is it a JSON file?") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        yield from _jsonl_rows(path)
        return
    if isinstance(rows, dict):
        raise DataError(f"{path}: a JSON object; expected an array of row objects (or one JSON object a line)")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected an array of row objects, got {type(rows).__name__}")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
        yield f"{path} row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Read a batch of rows at a time (pyarrow), never the whole file into Python at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    number = 0
    for batch in reader.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path} row {number}", row
            number += 1


def _saved_dataset_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several kinds for a broken directory
        raise DataError(f"{path}: cannot load the saved dataset ({str(exc).splitlines()[0]})") from None
    yield from _dataset_rows(str(path), loaded)


def _hub_dataset_rows(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A Hub dataset id, ORG/NAME[@REVISION][:SPLIT] (split default: train), found in the HF cache (or
    downloaded) like a model, then read as its data files: those whose path names the split, else all."""
    spec, _, split = name.partition(":")
    try:
        snapshot = hub_snapshot(spec, "dataset")
    except HubError as exc:
        raise DataError(f"data {name!r} is no local path, and {exc}") from None
    files = sorted(p for p in snapshot.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    chosen = [
        p
        for p in files
        if re.search(rf"(^|[/_.-]){re.escape(split or 'train')}([/_.-]|$)", str(p.relative_to(snapshot)))
    ]
    if not chosen and split:
        raise DataError(f"data {name!r}: no data file of split {split!r} in {snapshot}")
    if not chosen and not files:
        raise DataError(f"data {name!r}: the dataset at {snapshot} holds no {', '.join(DATA_SUFFIXES)} file")
    for file in chosen or files:
        yield from _file_rows(file)


def _dataset_rows(name: str, loaded: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{name}: a dataset of splits {sorted(loaded)}; name one as a directory of its own")
        loaded = loaded["train"]
    for number, row in enumerate(loaded):
        yield f"{name} row {number}", row


def _prompt_parts(row: dict[str, Any], fmt: PromptFormat, where: str) -> tuple[str | None, list[dict] | None]:
    """The row's prompt as (string, None) or (None, messages): `messages`, or `prompt_key` holding either a
    string or a list of chat messages (verl's and TRL's conversational rows). With data.system_prompt, a system
    message goes first when the messages have none."""
    value = row.get("messages") if "messages" in row else row.get(fmt.prompt_key)
    field_name = "messages" if "messages" in row else fmt.prompt_key
    if isinstance(value, str):
        if not fmt.system_prompt:
            return value, None
        value = [{"role": "user", "content": value}]
    if isinstance(value, list | tuple):
        messages = list(value)
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(f"{where}: {field_name!r} must be a non-empty list of {{'role': str, 'content': str}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if fmt.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
        return None, messages
    raise DataError(
        f"{where}: needs a field {fmt.prompt_key!r} (data.prompt_key) holding a string or chat messages, or a "
        f"'messages' list; the row has {sorted(row)[:8]}"
    )


def _tokenize(row: dict[str, Any], where: str, tokenizer, fmt: PromptFormat) -> Prompt | None:
    """The row's prompt tokens; None for a prompt over the length limit when such prompts are dropped."""
    (ids,) = encode_texts(tokenizer, [_prompt_text(row, where, tokenizer, fmt)])
    return _prompt_of(ids, row, where, fmt)


def _prompt_text(row: dict[str, Any], where: str, tokenizer, fmt: PromptFormat) -> str:
    """The row's prompt as the text to tokenize: its chat template applied where it has one."""
    text, messages = _prompt_parts(row, fmt, where)
    if not (text or "").strip() and not any(m["content"].strip() for m in messages or [] if m["role"] != "system"):
        raise DataError(f"{where}: the prompt is empty; drop the row or give it a prompt")
    if messages is not None or (fmt.apply_chat_template and tokenizer.chat_template is not None):
        if tokenizer.chat_template is None:
            raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
        messages = messages or [{"role": "user", "content": text}]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **fmt.chat_template_kwargs
            )
        except Exception as exc:  # jinja raises its own kinds for a template that rejects the messages
            raise DataError(f"{where}: the chat template refuses these messages ({exc})") from None
    return text


def _prompt_of(ids: list[int], row: dict[str, Any], where: str, fmt: PromptFormat) -> Prompt | None:
    """The prompt of the row's token ids; None when over the length limit and such prompts are dropped."""
    if not ids:
        raise DataError(f"{where}: the prompt is empty; drop the row or give it a prompt")
    if len(ids) > fmt.max_prompt_length:
        if fmt.filter_overlong:
            return None
        raise DataError(
            f"{where}: the prompt has {len(ids)} tokens, more than data.max_prompt_length={fmt.max_prompt_length}; "
            "raise the limit or set data.filter_overlong_prompts=true to drop such prompts"
        )
    extra = {k: v for k, v in row.items() if k not in (fmt.prompt_key, "messages") and is_field_value(v)}
    return Prompt(np.asarray(ids, dtype=np.int32), extra)


@dataclass
class Pair:
    """A prompt with a fixed response (offline scoring): the response ends with the end-of-sequence token."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    extra: dict[str, FieldValue] = field(default_factory=dict)


def load_pairs(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    data: DataSection | PromptFormat | None = None,
    response_key: str = "response",
    max_response_length: int = 64,
    keep_source: bool = False,
) -> list[Pair]:
    """Prompt + response rows: a prompt (as `load_prompts` reads it) with a string `response_key` (or TRL's
    `completion`, a string or the assistant's messages), or chat `messages` whose last message is the
    assistant's response. `keep_source` as for `load_prompts`. No prompt is dropped: each row is scored."""
    fmt = data if isinstance(data, PromptFormat) else PromptFormat.of(data or DataSection())
    fmt = PromptFormat(**{**fmt.__dict__, "filter_overlong": False})
    if not files:
        raise DataError("no data files given; pass data files of prompts with responses")
    pairs = []
    for name in files:
        for where, row in iter_rows(name):
            messages = row.get("messages")
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
                last = messages[-1]
                if last.get("role") != "assistant" or not isinstance(last.get("content"), str) or len(messages) < 2:
                    raise DataError(f"{where}: 'messages' must end with the assistant's response, after the prompt")
                response, row = last["content"], {**row, "messages": messages[:-1]}
            elif (response := _response_of(row, response_key)) is None:
                raise DataError(
                    f"{where}: needs a string field {response_key!r} (data.response_key), a 'completion', or "
                    "'messages' ending with the assistant's response"
                )
            row = {k: v for k, v in row.items() if k not in (response_key, "completion")}
            prompt = _tokenize(row, where, tokenizer, fmt)
            ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) > max_response_length:
                raise DataError(
                    f"{where}: the response has {len(ids)} tokens with its end-of-sequence token, more than "
                    f"rollout.max_new_tokens={max_response_length}; raise it"
                )
            if keep_source:
                prompt.extra[PROMPT_FIELD] = prompt_source(*_prompt_parts(row, fmt, where))
            pairs.append(Pair(prompt.ids, np.asarray(ids, dtype=np.int32), prompt.extra))
    if not pairs:
        raise DataError(f"data files {files} hold no rows")
    return pairs


def _response_of(row: dict[str, Any], response_key: str) -> str | None:
    """The response: `response_key` as a string, or TRL's `completion` (a string, or assistant messages)."""
    for key in (response_key, "completion"):
        value = row.get(key)
        if isinstance(value, str):
            return value
        if (
            isinstance(value, list)
            and value
            and all(isinstance(m, dict) and m.get("role") == "assistant" for m in value)
            and all(isinstance(m.get("content"), str) for m in value)
        ):
            return "".join(m["content"] for m in value)
    return None


class PromptCursor:
    """Walks the prompts epoch after epoch, reshuffled per epoch; its state is two integers."""

    def __init__(self, count: int, shuffle: bool, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.count, self.shuffle, self.seed = count, shuffle, seed
        self.epoch, self.position = epoch, position
        self._order = self._order_of(epoch)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(self.count))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> tuple[str, int]:
        """(group id, prompt index) of the next prompt."""
        if self.position >= self.count:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._order_of(self.epoch)
        index = self._order[self.position]
        group_id = f"{self.epoch}:{self.position}"
        self.position += 1
        return group_id, index

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
