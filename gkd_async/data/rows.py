"""The rows of a data set, whatever it is stored as: JSONL, JSON, parquet, a `datasets.save_to_disk`
directory, a Hub dataset in the HF cache, or a built-in task (tiny:NAME). Each row comes with where it is
(file and line) so that an error can name it.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gkd_async.data.tasks import TASKS, task_rows
from gkd_async.errors import GKDError
from gkd_async.models.hub import HubError, hub_snapshot

TASK_PREFIX = "tiny:"


class DataError(GKDError):
    """A data file is missing or one of its rows is malformed."""


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
