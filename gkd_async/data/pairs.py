"""(prompt, answer) pairs for supervised fine-tuning (gkd-async demo's teacher and warm start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from gkd_async.config.model_data import DataSection
from gkd_async.data.prompts import PromptFormat, _prompt_parts, _tokenize
from gkd_async.data.rows import DataError, iter_rows
from gkd_async.engines.cross_tokenizer import PROMPT_FIELD, prompt_source
from gkd_async.transport.wire import FieldValue


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
