"""Prompts for the coordinator: JSONL files (or a built-in synthetic task), tokenized once, and a
resumable shuffled cursor over them."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from gkd_async.cross_tokenizer import PROMPT_FIELD, prompt_source
from gkd_async.errors import GKDError
from gkd_async.records import Scalar
from gkd_async.tasks import TASKS, task_rows

TASK_PREFIX = "tiny:"


class DataError(GKDError):
    """A data file is missing or one of its rows is malformed."""


@dataclass
class Prompt:
    ids: np.ndarray
    extra: dict[str, Scalar] = field(default_factory=dict)


def load_prompts(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    prompt_key: str = "prompt",
    max_prompt_length: int = 256,
    keep_source: bool = False,
) -> list[Prompt]:
    """The prompts of `files`, tokenized; with `keep_source`, each also carries its messages or prompt string
    (`gkd_prompt`), for a teacher of another tokenizer to template and tokenize its own way."""
    if not files:
        raise DataError("data.train_files is empty; give JSONL files or a built-in task such as tiny:addition")
    prompts = []
    for name in files:
        for where, row in _rows(name):
            prompt = _tokenize(row, where, tokenizer, prompt_key, max_prompt_length)
            if keep_source:
                prompt.extra[PROMPT_FIELD] = prompt_source(row.get(prompt_key), row.get("messages"))
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"data.train_files {files} hold no prompts")
    return prompts


def _rows(name: str):
    if name.startswith(TASK_PREFIX):
        task = name[len(TASK_PREFIX) :]
        if task not in TASKS:
            raise DataError(f"unknown built-in task {name!r}; available: {', '.join(TASK_PREFIX + t for t in TASKS)}")
        for i, row in enumerate(task_rows(task)):
            yield f"{name} row {i}", row
        return
    path = Path(name)
    if not path.is_file():
        raise DataError(f"data file {name} does not exist (data.train_files)")
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}:{number}: expected a JSON object, got {type(row).__name__}")
            yield f"{name}:{number}", row


def _tokenize(row: dict[str, Any], where: str, tokenizer, prompt_key: str, max_len: int) -> Prompt:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        if tokenizer.chat_template is None:
            raise DataError(f"{where}: chat 'messages' need a tokenizer with a chat template")
    elif isinstance(row.get(prompt_key), str):
        messages = None
    else:
        raise DataError(f"{where}: needs a string field {prompt_key!r} (data.prompt_key) or a 'messages' list")
    if messages is not None or tokenizer.chat_template is not None:
        messages = messages or [{"role": "user", "content": row[prompt_key]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = row[prompt_key]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"{where}: the prompt is empty after tokenization")
    if len(ids) > max_len:
        raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than data.max_prompt_length={max_len}")
    extra = {k: v for k, v in row.items() if k not in (prompt_key, "messages") and _is_scalar(v)}
    return Prompt(np.asarray(ids, dtype=np.int32), extra)


@dataclass
class Pair:
    """A prompt with a fixed response (offline scoring): the response ends with the end-of-sequence token."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    extra: dict[str, Scalar] = field(default_factory=dict)


def load_pairs(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    prompt_key: str = "prompt",
    response_key: str = "response",
    max_prompt_length: int = 256,
    max_response_length: int = 64,
    keep_source: bool = False,
) -> list[Pair]:
    """Prompt + response rows: a string `prompt_key` with a string `response_key`, or chat `messages` whose last
    message is the assistant's response. `keep_source` as for `load_prompts`."""
    if not files:
        raise DataError("no data files given; pass JSONL files of prompts with responses")
    pairs = []
    for name in files:
        for where, row in _rows(name):
            messages = row.get("messages")
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
                last = messages[-1]
                if last.get("role") != "assistant" or not isinstance(last.get("content"), str) or len(messages) < 2:
                    raise DataError(f"{where}: 'messages' must end with the assistant's response, after the prompt")
                response, row = last["content"], {**row, "messages": messages[:-1]}
            elif isinstance(row.get(response_key), str):
                response = row[response_key]
            else:
                raise DataError(
                    f"{where}: needs a string field {response_key!r} (data.response_key) or 'messages' ending with "
                    "the assistant's response"
                )
            prompt = _tokenize(
                {k: v for k, v in row.items() if k != response_key}, where, tokenizer, prompt_key, max_prompt_length
            )
            ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) > max_response_length:
                raise DataError(
                    f"{where}: the response has {len(ids)} tokens with its end-of-sequence token, more than "
                    f"rollout.max_new_tokens={max_response_length}; raise it"
                )
            if keep_source:
                prompt.extra[PROMPT_FIELD] = prompt_source(row.get(prompt_key), row.get("messages"))
            pairs.append(Pair(prompt.ids, np.asarray(ids, dtype=np.int32), prompt.extra))
    if not pairs:
        raise DataError(f"data files {files} hold no rows")
    return pairs


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


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
