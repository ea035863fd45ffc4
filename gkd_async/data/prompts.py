"""Prompts for the coordinator: rows of the train and validation sets templated and tokenized once (in batches,
and past POOL_AFTER_ROWS rows in worker processes too), with the prompt cache in front.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from gkd_async.config.model_data import DataSection
from gkd_async.data import prompt_cache
from gkd_async.data.prompt import Prompt
from gkd_async.data.rows import DataError, iter_rows
from gkd_async.engines.cross_tokenizer import PROMPT_FIELD, prompt_source
from gkd_async.transport.wire import is_field_value


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
