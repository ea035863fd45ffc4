"""`gkd-async score DATA --out DIR`: the teacher scores a fixed data set of prompts with responses once,
into a scored data set (gkd_async/data/scored_dataset.py) that `rollout.source=dataset` trains from.

The rows go through the same streams as a run: each row is a rollout record of one sample in the rollouts
stream, the run's teacher scorers (`pipeline.num_teacher_scorers` Ray actors; more can join with
`gkd-async worker teacher`) score it into the scored stream, and this process writes what comes out into
shards, acknowledging entries only once their shard and the manifest are on disk. Rows are fed a window at
a time, so Redis holds a few shards' worth whatever the data set's size. A row a scorer dead-letters is
listed as failed in the manifest; running the same command again scores the failed and the missing rows
and keeps the rest.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gkd_async.config.schema import GKDConfig
from gkd_async.data.pairs import Pair, load_pairs
from gkd_async.data.scored_dataset import (
    FORMAT,
    VERSION,
    ScoredDatasetError,
    ScoredRow,
    data_fingerprint,
    read_manifest,
    shard_rows,
    write_manifest,
    write_shard,
)
from gkd_async.errors import GKDError, RecordError
from gkd_async.logs import get_logger
from gkd_async.models.loading import load_tokenizer, model_vocab_size
from gkd_async.preflight.checks import check_context_lengths, check_served_teacher, check_teacher_fits_student
from gkd_async.run_state import RunState
from gkd_async.transport.local_redis import LocalRedisServer
from gkd_async.transport.records import RolloutRecord, ScoredRecord, decode_scored_record, encode_rollout_record
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import StreamProducer, trim_acknowledged
from workers.common import RunContext, RunFailedError
from workers.launch.ray_actors import gpu_share, init_ray, stage_actor, stage_args, stage_request, stop_ray

ProgressFn = Callable[[int, int], None]  # (rows scored or failed, rows in the data set)
WRITER_GROUP = "writer"
# Settings that decide what the scores are: a directory scored with others cannot be resumed with these.
DECISIVE = ("teacher", "k", "temperature", "student_vocab", "data_fingerprint")


def score_dataset(
    config: GKDConfig,
    files: list[str],
    out_dir: Path,
    shard_size: int = 1024,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score every row of `files` not yet in `out_dir`; returns the manifest's summary."""
    data, gkd = config.data, config.gkd
    if config.model.teachers:
        raise GKDError("gkd-async score scores with one teacher, model.teacher; drop model.teachers")
    if config.gkd.teacher_signal == "hidden":
        raise GKDError(
            "gkd-async score stores the teacher's top-k log-probs (gkd.teacher_topk); its hidden states "
            "(gkd.teacher_signal=hidden) go to the learner only in a run: set gkd.teacher_signal=topk"
        )
    tokenizer = load_tokenizer(config.model.student, config.model.trust_remote_code)
    pairs = load_pairs(
        files,
        tokenizer,
        data,
        data.response_key,
        config.rollout.max_new_tokens,
        keep_source=config.teacher.cross_tokenizer,  # a teacher of another tokenizer templates the prompt itself
    )
    if config.teacher.backend == "openai":
        check_served_teacher(config)
        teacher = config.teacher.openai.model or config.teacher.openai.base_url
    else:
        check_teacher_fits_student(config)
        teacher = config.model.teacher
    check_context_lengths(config)
    settings = {
        "teacher": teacher,
        "k": gkd.teacher_topk,
        "temperature": gkd.distill_temperature,
        "student_vocab": model_vocab_size(config.model.student, config.model.trust_remote_code),
        "data_fingerprint": data_fingerprint(pairs),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _resumable_manifest(out_dir, settings, files, pairs)
    done = {int(row) for entry in manifest["shards"] for row in shard_rows(out_dir / entry["file"])}
    todo = [row for row in range(len(pairs)) if row not in done]
    manifest["failed"] = {}  # failed rows are tried again
    if todo:
        _score_rows(config, pairs, todo, out_dir, manifest, shard_size, on_progress)
    manifest["complete"] = True
    write_manifest(out_dir, manifest)
    return {
        "out_dir": str(out_dir),
        "rows": len(pairs),
        "scored_rows": manifest["scored_rows"],
        "failed_rows": len(manifest["failed"]),
        "shards": len(manifest["shards"]),
    }


def _resumable_manifest(out_dir: Path, settings: dict[str, Any], files: list[str], pairs: list[Pair]) -> dict:
    manifest = read_manifest(out_dir)
    if manifest is None:
        return {
            "format": FORMAT,
            "version": VERSION,
            **settings,
            "data": {"files": list(files), "rows": len(pairs)},
            "longest_prompt": max(len(p.prompt_ids) for p in pairs),
            "longest_response": max(len(p.response_ids) for p in pairs),
            "shards": [],
            "scored_rows": 0,
            "failed": {},
            "complete": False,
        }
    differs = [
        f"{key} {manifest.get(key)!r} -> {settings[key]!r}" for key in DECISIVE if manifest.get(key) != settings[key]
    ]
    if differs:
        raise ScoredDatasetError(
            f"{out_dir} was scored with other settings or data ({'; '.join(differs)}): score into a new --out "
            "directory, or use the same data and settings to resume it"
        )
    return manifest


def _score_rows(
    config: GKDConfig,
    pairs: list[Pair],
    todo: list[int],
    out_dir: Path,
    manifest: dict[str, Any],
    shard_size: int,
    on_progress: ProgressFn | None,
) -> None:
    log = get_logger(role="score")
    cfg = config.model_copy(deep=True)
    cfg.pipeline.run_id = f"score-{uuid.uuid4().hex[:8]}"
    cfg.rollout.n = 1
    server = LocalRedisServer().start() if cfg.pipeline.redis_url is None else None
    url = server.url if server is not None else cfg.pipeline.redis_url.get_secret_value()
    ctx = RunContext(cfg, url, cfg.pipeline.run_id, out_dir / "logs" / cfg.pipeline.run_id)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    started_ray, actors = False, []
    try:
        connect_redis(url).close()
        ctx.set_state(RunState.running())
        started_ray = init_ray(cfg.ray.address)
        actors = _start_scorers(ctx)
        writer = _ShardWriter(
            ctx,
            pairs,
            out_dir,
            manifest,
            shard_size,
            np.float16 if cfg.teacher.logprob_dtype == "float16" else np.float32,
        )
        producer = StreamProducer(ctx.client, ctx.names.rollouts, url)
        consumer = ctx.consumer(ctx.names.scored, WRITER_GROUP, "writer")
        sent, window = 0, 4 * shard_size
        log.info("scoring", rows=len(todo), scorers=len(actors), run_id=ctx.run_id)
        while writer.settled < len(todo):
            if sent < len(todo) and writer.outstanding(sent) < window:
                batch = todo[sent : sent + shard_size]
                sent += len(batch)
                producer.add([encode_rollout_record(_rollout(ctx.run_id, row, pairs[row])) for row in batch])
            writer.take(consumer.read_records(shard_size, cfg.pipeline.read_block_ms, writer.decode), consumer)
            writer.take_failures()
            while writer.pending_rows >= shard_size or 0 < writer.pending_rows == len(todo) - writer.settled:
                writer.flush(consumer)
            _check_scorers(actors)
            if on_progress is not None:
                on_progress(len(pairs) - len(todo) + writer.settled + writer.pending_rows, len(pairs))
        writer.flush(consumer)
    finally:
        ctx.set_state(RunState.stopping("scored"))
        _stop_scorers(actors)
        if started_ray:
            stop_ray()
        if server is not None:
            server.stop()


def _rollout(run_id: str, row: int, pair: Pair) -> RolloutRecord:
    length = len(pair.response_ids)
    return RolloutRecord(
        run_id=run_id,
        group_id=str(row),
        sample_ids=[f"{row}/0"],
        step=0,
        policy_version=0,
        prompt_ids=pair.prompt_ids,
        response_ids=pair.response_ids,
        response_lengths=np.array([length], np.int32),
        behaviour_logprobs=np.zeros(length, np.float32),
        extra=pair.extra,
    )


class _ShardWriter:
    """Scored rows in memory until a shard's worth; then the shard, the manifest, and only then the acks."""

    def __init__(
        self, ctx: RunContext, pairs: list[Pair], out_dir: Path, manifest: dict, shard_size: int, dtype: type
    ) -> None:
        self.ctx, self.pairs, self.out_dir, self.manifest = ctx, pairs, out_dir, manifest
        self.shard_size, self.dtype = shard_size, dtype
        self.rows: dict[int, tuple[ScoredRow, str]] = {}  # row -> (its scores, its entry), in arrival order
        self.written: set[int] = set()  # rows this call put into shards
        self.settled = 0  # rows written to a shard or failed
        self.dead_cursor = "0"

    @property
    def pending_rows(self) -> int:
        return len(self.rows)

    def outstanding(self, sent: int) -> int:
        return sent - self.settled - self.pending_rows

    def decode(self, payload: bytes) -> tuple[int, ScoredRecord]:
        """The row a scored record answers, and the record; a RecordError unless it is that row at the run's top-k."""
        record = decode_scored_record(payload, self.ctx.max_record_bytes)
        try:
            row = int(record.rollout.group_id)
            pair = self.pairs[row]
        except (ValueError, IndexError) as err:
            raise RecordError(f"the record names no row of the data set: {err}") from None
        if record.k != self.manifest["k"] or not np.array_equal(record.rollout.response_ids, pair.response_ids):
            raise RecordError(f"the record is not row {row} scored at top-{self.manifest['k']}")
        if record.token_logprobs is None:
            raise RecordError("the record has no token_logprobs (a teacher scorer of an older version?)")
        return row, record

    def take(self, decoded, consumer) -> None:
        for entry, (row, record) in decoded:
            pair = self.pairs[row]
            if row in self.rows or row in self.written or str(row) in self.manifest["failed"]:
                consumer.ack([entry.id])  # a second copy (a reclaimed entry scored twice)
                continue
            scores = ScoredRow(
                row, pair.prompt_ids, pair.response_ids, record.topk_ids, record.topk_logprobs, record.token_logprobs,
                pair.extra,
            )  # fmt: skip
            self.rows[row] = (scores, entry.id)

    def take_failures(self) -> None:
        """Rows a scorer dead-lettered: failed, with the scorer's reason."""
        while response := self.ctx.client.xread({self.ctx.names.dead: self.dead_cursor}, count=512):
            for entry_id, fields in response[0][1]:
                self.dead_cursor = entry_id
                group = fields.get(b"group_id", b"").decode(errors="replace")
                row = int(group) if group.isdigit() else None
                if (
                    row is not None
                    and row not in self.rows
                    and row not in self.written
                    and group not in self.manifest["failed"]
                ):
                    self.manifest["failed"][group] = fields.get(b"reason", b"").decode(errors="replace")
                    self.settled += 1

    def flush(self, consumer) -> None:
        """One shard of the first `shard_size` rows that arrived (fewer at the end), then their acks."""
        if not self.rows:
            write_manifest(self.out_dir, self.manifest)
            return
        taken = list(self.rows)[: self.shard_size]
        rows = [self.rows[row][0] for row in sorted(taken)]
        name = write_shard(self.out_dir, len(self.manifest["shards"]), rows, self.dtype)
        self.manifest["shards"].append({"file": name, "rows": len(rows)})
        self.manifest["scored_rows"] += len(rows)
        write_manifest(self.out_dir, self.manifest)
        consumer.ack([self.rows[row][1] for row in taken])
        for stream in (self.ctx.names.rollouts, self.ctx.names.scored):  # Redis keeps only what is in flight
            trim_acknowledged(self.ctx.client, stream, self.ctx.shown_url)
        for row in taken:
            del self.rows[row]
            self.written.add(row)
        self.settled += len(rows)


def _start_scorers(ctx: RunContext) -> list:
    import ray

    cfg = ctx.config
    count = cfg.pipeline.num_teacher_scorers
    request = stage_request(cfg.ray.teacher, gpu_share(ray.cluster_resources().get("GPU", 0), count))
    actors = []
    for i in range(count):
        actor = stage_actor(ctx, "teacher", i, request).remote("teacher", *stage_args(ctx))
        actors.append((actor, actor.run.remote()))
    return actors


def _check_scorers(actors: list) -> None:
    """A scorer that raised ends the scoring with its message; one that died leaves its rows to the others."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    refs = [ref for _, ref in actors]
    finished, _ = ray.wait(refs, timeout=0, num_returns=len(refs)) if refs else ([], [])
    for ref in finished:
        try:
            ray.get(ref)
        except RayTaskError as err:
            cause = getattr(err, "cause", None) or err
            raise RunFailedError(f"a teacher scorer failed: {cause}") from None
        except RayActorError:
            pass
    if actors and len(finished) == len(refs):
        raise GKDError("every teacher scorer has stopped; nothing is left to score the rows")


def _stop_scorers(actors: list, grace_s: float = 15.0) -> None:
    import ray

    refs = [ref for _, ref in actors]
    if refs:
        ray.wait(refs, timeout=grace_s, num_returns=len(refs))
    for actor, _ in actors:
        ray.kill(actor)
