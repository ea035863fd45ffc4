"""A data set scored by the teacher once (`gkd-async score`), for supervised KD with no teacher per epoch
(`rollout.source=dataset`).

A directory of safetensors shards and a manifest. Each shard holds whole records as flat arrays: `row` [N]
(the data set row of each record), `prompt_offsets` / `response_offsets` [N + 1] into `prompt_ids` /
`response_ids`, and per response token `topk_ids` [T, k], `topk_logprobs` [T, k] and `token_logprobs` [T];
its metadata holds each record's extra data fields as JSON. `manifest.json` says what was scored with what
(teacher, k, temperature, a fingerprint of the tokenized data), which shards exist and which rows failed;
it is replaced atomically after each shard, so an interrupted scoring resumes where the last shard ended.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gkd_async.data.pairs import Pair
from gkd_async.data.prompt import Prompt
from gkd_async.errors import GKDError
from gkd_async.transport.wire import FieldValue

FORMAT = "gkd-async scored dataset"
VERSION = 1
MANIFEST = "manifest.json"
ROW_FIELD = "gkd_row"  # the data set row of a prompt admitted from a scored data set


class ScoredDatasetError(GKDError):
    """A scored data set directory is missing, incomplete, or was scored with other settings."""


@dataclass
class ScoredRow:
    row: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray
    extra: dict[str, FieldValue]


def data_fingerprint(pairs: Sequence[Pair]) -> str:
    """What was scored: the token ids of every prompt and response, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.response_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ScoredDatasetError(f"{path} is not a {FORMAT} of version {VERSION}")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    temporary = directory / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, directory / MANIFEST)


def write_shard(directory: Path, index: int, rows: Sequence[ScoredRow], logprob_dtype: type) -> str:
    """One shard file of `rows`; returns its name. Written under a temporary name, then renamed."""
    name = f"shard-{index:05d}.safetensors"
    k = rows[0].topk_ids.shape[1] if rows else 0
    tensors = {
        "row": np.asarray([r.row for r in rows], np.int64),
        "prompt_offsets": np.cumsum([0, *(len(r.prompt_ids) for r in rows)]).astype(np.int64),
        "prompt_ids": np.concatenate([r.prompt_ids for r in rows]).astype(np.int32),
        "response_offsets": np.cumsum([0, *(len(r.response_ids) for r in rows)]).astype(np.int64),
        "response_ids": np.concatenate([r.response_ids for r in rows]).astype(np.int32),
        "topk_ids": np.concatenate([r.topk_ids.reshape(len(r.response_ids), k) for r in rows]).astype(np.int32),
        "topk_logprobs": np.concatenate([r.topk_logprobs.reshape(len(r.response_ids), k) for r in rows]).astype(
            logprob_dtype
        ),
        "token_logprobs": np.concatenate([r.token_logprobs for r in rows]).astype(np.float32),
    }
    temporary = directory / f".{name}.tmp"
    save_file(tensors, str(temporary), metadata={"extra": json.dumps([r.extra for r in rows])})
    os.replace(temporary, directory / name)
    return name


def shard_rows(path: Path) -> np.ndarray:
    with safe_open(str(path), framework="np") as shard:
        return shard.get_tensor("row")


class ScoredDataset:
    """Reads a complete scored data set: its prompts (for admission) and each row's record, one at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise ScoredDatasetError(
                f"{self.directory} holds no scored data set ({MANIFEST} is missing): make one with "
                f"`gkd-async score DATA.jsonl --out {self.directory}`"
            )
        if not manifest.get("complete"):
            raise ScoredDatasetError(
                f"{self.directory} is scored only in part ({manifest.get('scored_rows', 0)} of "
                f"{manifest['data']['rows']} rows): run the same `gkd-async score ... --out {self.directory}` "
                "again to finish it"
            )
        self.manifest = manifest
        self.where: dict[int, tuple[int, int]] = {}  # row -> (shard, position in it)
        self._shards: list[Any] = []
        self._offsets: list[tuple[np.ndarray, np.ndarray]] = []
        self._extra: list[list[dict[str, FieldValue]]] = []
        for index, entry in enumerate(manifest["shards"]):
            shard = safe_open(str(self.directory / entry["file"]), framework="np")
            self._shards.append(shard)
            self._offsets.append((shard.get_tensor("prompt_offsets"), shard.get_tensor("response_offsets")))
            self._extra.append(json.loads(shard.metadata()["extra"]))
            for position, row in enumerate(shard.get_tensor("row").tolist()):
                self.where[row] = (index, position)
        if not self.where:
            raise ScoredDatasetError(f"{self.directory} holds no scored rows (every row failed: see {MANIFEST})")

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    def rows(self) -> list[int]:
        return sorted(self.where)

    def prompts(self) -> list[Prompt]:
        """The prompt of every scored row, in row order, carrying its row in `extra[ROW_FIELD]`."""
        prompts = []
        for row in self.rows():
            scored = self.read(row)
            prompts.append(Prompt(scored.prompt_ids, {**scored.extra, ROW_FIELD: row}))
        return prompts

    def read(self, row: int) -> ScoredRow:
        if row not in self.where:
            raise KeyError(f"row {row} is not in the scored data set {self.directory}")
        index, position = self.where[row]
        shard, (prompt_offsets, response_offsets) = self._shards[index], self._offsets[index]
        p0, p1 = int(prompt_offsets[position]), int(prompt_offsets[position + 1])
        r0, r1 = int(response_offsets[position]), int(response_offsets[position + 1])
        return ScoredRow(
            row=row,
            prompt_ids=shard.get_slice("prompt_ids")[p0:p1],
            response_ids=shard.get_slice("response_ids")[r0:r1],
            topk_ids=shard.get_slice("topk_ids")[r0:r1],
            topk_logprobs=shard.get_slice("topk_logprobs")[r0:r1].astype(np.float32),
            token_logprobs=shard.get_slice("token_logprobs")[r0:r1],
            extra=self._extra[index][position],
        )
