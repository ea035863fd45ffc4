"""A teacher behind an OpenAI-compatible server (teacher.backend=openai): vLLM's `/v1/completions` with
`prompt_logprobs`, asked for the prompt + response ids of each sample.

The server returns, at every position after the first, a mapping of token id to log-prob holding the
top-k tokens and the token actually there (k + 1 entries when that token is outside the top-k). Row t of a
sample is the entry at position len(prompt) + t: the distribution of response token t given everything
before it, as the in-process engines give it. The log-probs are of the raw logits, so only temperature 1
is possible (config refuses the rest).

A server that does not answer after the client's retries (connection refused or reset, timeouts, 5xx,
429) raises TeacherServerUnavailableError: the scorer leaves its entries pending, as a dead teacher would. A
request the server refuses (4xx) is the request's fault, except a wrong model name or key, which are the
config's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
import openai

from gkd_async.config.engines import ServedTeacherSection
from gkd_async.engines.base import TeacherEngine
from gkd_async.errors import ConfigError, TeacherServerUnavailableError
from gkd_async.redaction import redact_url

T = TypeVar("T")

START_HINT = (
    "start one, e.g. `python -m vllm.entrypoints.openai.api_server --model PATH --max-logprobs K`, "
    "or fix teacher.openai.base_url"
)


def check_key_transport(base_url: str, settings: ServedTeacherSection, key: str | None) -> None:
    """Refuse to send an API key in clear (plain http://) to another machine, unless told to."""
    parts = urllib.parse.urlsplit(base_url)
    if not key or parts.scheme != "http" or settings.allow_insecure or is_loopback(parts.hostname or ""):
        return
    raise ConfigError(
        f"teacher.openai.base_url={redact_url(base_url)} is plain http:// to another machine: the API key from "
        f"${settings.api_key_env} would cross the network in clear. Use https://, unset {settings.api_key_env} "
        "if the server needs no key, or set teacher.openai.allow_insecure=true on a network you trust"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServedRequestError(ValueError):
    """The server refused one request (4xx other than a wrong model or key): the request's entries are at
    fault, or the run's settings are when every request is refused."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int | None


class ServedTeacherEngine(TeacherEngine):
    """Top-k log-probs of every response token from a served teacher, `teacher.batch_size` samples a
    request and up to `max_concurrency` requests in flight."""

    def __init__(self, settings: ServedTeacherSection) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)  # what messages and logs show: no credentials
        key = os.environ.get(settings.api_key_env)
        check_key_transport(self.base_url, settings, key)
        self.api_key = key or "EMPTY"
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="served-teacher")
        self.served = self.describe()
        self.model = self.served.name

    def describe(self) -> ServedModel:
        """The model to ask for: teacher.openai.model, checked against what the server lists, or the only one."""
        try:
            page = self._request("the model list", self.client.models.list)
        except TeacherServerUnavailableError as exc:
            raise TeacherServerUnavailableError(f"{exc}; {START_HINT}") from None
        served = {entry.id: entry for entry in page.data}
        wanted = self.settings.model
        if wanted is None:
            if len(served) != 1:
                raise ConfigError(
                    f"the teacher server at {self.shown_url} serves {sorted(served) or 'no model'}; set "
                    "teacher.openai.model to the one to score with"
                )
            wanted = next(iter(served))
        if wanted not in served:
            raise ConfigError(
                f"teacher.openai.model={wanted!r} is not served at {self.shown_url}; it serves {sorted(served)}"
            )
        return ServedModel(wanted, getattr(served[wanted], "max_model_len", None))

    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids of `text` (vLLM's /tokenize), or None when the server has no such route."""
        root, shown_root = self.base_url.removesuffix("/v1"), self.shown_url.removesuffix("/v1")
        try:
            response = httpx.post(
                f"{root}/tokenize",
                json={"model": self.model, "prompt": text},
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=self.settings.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise TeacherServerUnavailableError(
                f"the teacher server at {shown_root} did not answer /tokenize: {exc}"
            ) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ConfigError(
                f"the teacher server at {shown_root} refused /tokenize ({response.status_code}): {response.text}"
            )
        return [int(t) for t in response.json()["tokens"]]

    def available(self) -> bool:
        """One quick try of the model list: whether the server answers now."""
        try:
            self.client.with_options(max_retries=0, timeout=min(5.0, self.settings.timeout_s)).models.list()
        except openai.APIError:
            return False
        return True

    def score(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        k: int,
        temperature: float,
        batch_size: int = 8,
        vocab_limit: int | None = None,
        sampled: bool = False,
        extra_ids: Sequence[np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """For each (prompt ids, response ids): top-k ids int32 [R, k], their log-probs float32 [R, k], and with
        `sampled` each response token's own log-prob [R]."""
        if extra_ids is not None:
            raise ConfigError(
                "a served teacher returns its own top-k only, not its log-probs at the student's top-k ids "
                "(gkd.topk_source=student or union): use teacher.backend=hf"
            )
        if temperature != 1.0:
            raise ConfigError(
                f"a served teacher scores at temperature 1 only (asked for {temperature}): "
                "set gkd.distill_temperature=1"
            )
        chunks = [list(pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
        results = [row for chunk in self.pool.map(lambda c: self._score_chunk(c, k), chunks) for row in chunk]
        for ids, _, _ in results:
            if vocab_limit is not None and ids.size and int(ids.max()) >= vocab_limit:
                raise ConfigError(
                    f"the served teacher returned token id {int(ids.max())}, outside the student's vocabulary of "
                    f"{vocab_limit}: serve a teacher of the student's tokenizer and output layer"
                )
        return results if sampled else [(ids, lps) for ids, lps, _ in results]

    def _score_chunk(
        self, chunk: list[tuple[np.ndarray, np.ndarray]], k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        sequences = [[int(t) for t in np.concatenate([prompt, response])] for prompt, response in chunk]
        raw = self._request(
            "a scoring request",
            lambda: self.client.completions.with_raw_response.create(
                model=self.model,
                prompt=sequences,
                max_tokens=1,
                temperature=0.0,
                extra_body={"prompt_logprobs": k},
            ),
        )
        choices = sorted(json.loads(raw.text)["choices"], key=lambda choice: choice["index"])
        if len(choices) != len(chunk):
            raise RuntimeError(f"the teacher server answered {len(choices)} choices for {len(chunk)} prompts")
        return [
            _response_rows(choice["prompt_logprobs"], sequence, len(prompt), len(response), k)
            for (prompt, response), sequence, choice in zip(chunk, sequences, choices, strict=True)
        ]

    def _request(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
            raise TeacherServerUnavailableError(
                f"the teacher server at {self.shown_url} did not answer {what} "
                f"({self.settings.max_retries} retries, {self.settings.timeout_s:g} s each): {exc}"
            ) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(
                f"the teacher server at {self.shown_url} refused the API key (from ${self.settings.api_key_env}): "
                f"{_message(exc)}"
            ) from None
        except openai.NotFoundError as exc:
            raise ConfigError(
                f"the teacher server at {self.shown_url} has no {what}: {_message(exc)}; check teacher.openai.base_url "
                "(the API root, ending in /v1) and teacher.openai.model"
            ) from None
        except openai.APIStatusError as exc:
            raise ServedRequestError(f"the teacher server refused {what}: {_message(exc)}") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    return str(exc)


def _response_rows(
    entries: list[dict[str, dict[str, Any]] | None], sequence: list[int], prompt_len: int, response_len: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[R, k] top-k ids and log-probs, best first, and the [R] log-probs of the response tokens themselves."""
    if entries is None or len(entries) != len(sequence):
        raise RuntimeError(
            f"the teacher server answered {0 if entries is None else len(entries)} prompt log-prob positions for "
            f"{len(sequence)} tokens: it does not support prompt_logprobs"
        )
    ids = np.zeros((response_len, k), np.int32)
    logprobs = np.zeros((response_len, k), np.float32)
    actual = np.zeros(response_len, np.float32)
    for row in range(response_len):
        position = prompt_len + row
        entry, token = entries[position], sequence[position]
        if entry is None or str(token) not in entry:
            raise RuntimeError(f"the teacher server gave no log-prob for token {token} at position {position}")
        actual[row] = entry[str(token)]["logprob"]
        # k + 1 entries: the token itself is outside the top-k and comes on top of it.
        ranked = [(int(t), v["logprob"]) for t, v in entry.items() if len(entry) <= k or int(t) != token]
        if len(ranked) != k:
            raise RuntimeError(f"the teacher server answered {len(entry)} log-probs at a position for top-{k}")
        ranked.sort(key=lambda item: -item[1])
        ids[row] = [t for t, _ in ranked]
        logprobs[row] = [lp for _, lp in ranked]
    return ids, logprobs, actual
