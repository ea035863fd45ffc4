"""The learner's de-duplication marks over a long run: Redis memory and resume time at 10k, 100k and 1M
trained samples, the intake's per-step marks (kept for the newest steps) against one hash of every trained
sample (the scheme before), measured in the same run on a private local redis-server.

Synthetic steps of 512 samples go through `Intake.commit` (the marks, the acknowledgement and the log line
a real step writes); resume is `Intake.restore` from a checkpoint taken 2 steps earlier (what a learner
killed after its checkpoint does). The hash baseline does what the intake did before: HSET every sample's
step, and on resume HSCAN the whole hash for the steps rolled back and rewrite the log by reading it.

    .venv/bin/python benchmarks/bench_marks.py [--samples 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gkd_async.config.loading import load_config
from gkd_async.data.cursor import PromptCursor
from gkd_async.transport.limits import RecordLimits
from gkd_async.transport.local_redis import LocalRedisServer
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import StreamConsumer, StreamNames, StreamProducer
from workers.learner.intake import Admission, Intake, IntakeSettings

PER_STEP = 512


@dataclass
class _Rollout:
    sample_ids: list[str]
    group_id: str


@dataclass
class _Record:
    rollout: _Rollout


@dataclass
class _Accepted:
    entry_id: str
    record: _Record


def intake_for(client, names: StreamNames, log: Path) -> Intake:
    settings = IntakeSettings(
        run_id=names.run_id, batch_size=PER_STEP, max_staleness=1, on_policy=True, teacher_on=True, k=8,
        temperature=1.0, max_record_bytes=2**20, limits=RecordLimits.for_run(load_config(), 100),
    )  # fmt: skip
    admission = Admission(
        [], PromptCursor(1, False, 0), StreamProducer(client, names.prompts), names.run_id, PER_STEP, 1
    )
    consumer = StreamConsumer(client, names.scored, "learner", "learner-0", dead_stream=names.dead)
    return Intake(client, names, consumer, admission, settings, log)


def step_samples(step: int) -> list[str]:
    return [f"{step}:{i}/0" for i in range(PER_STEP)]


def marks_bytes(client, pattern: str) -> int:
    return sum(client.memory_usage(k) or 0 for k in client.scan_iter(match=pattern, count=1000))


def run_intake(client, samples: int, tmp: Path) -> tuple[float, float]:
    names = StreamNames(f"marks-{samples}")
    intake = intake_for(client, names, tmp / f"intake-{samples}.jsonl")
    steps = samples // PER_STEP
    checkpoint = None
    for step in range(1, steps + 1):
        ids = step_samples(step)
        intake.commit(step, [_Accepted("0-1", _Record(_Rollout(ids, f"{step}:0")))])
        if step == steps - 2:
            checkpoint = intake.state()
    memory = marks_bytes(client, names.trained_pattern)
    resumed = intake_for(client, names, tmp / f"intake-{samples}.jsonl")
    start = time.perf_counter()
    resumed.restore(json.loads(json.dumps(checkpoint)), steps - 2)
    return memory, time.perf_counter() - start


def run_hash(client, samples: int, tmp: Path) -> tuple[float, float]:
    key, log = f"hash-{samples}", tmp / f"hash-{samples}.jsonl"
    steps = samples // PER_STEP
    with log.open("w") as out:
        for step in range(1, steps + 1):
            ids = step_samples(step)
            client.hset(key, mapping=dict.fromkeys(ids, step))
            out.write(json.dumps({"step": step, "sample_ids": ids}) + "\n")
    memory = client.memory_usage(key) or 0
    start = time.perf_counter()
    later = [sid for sid, at in client.hscan_iter(key, count=1000) if int(at) > steps - 2]
    for i in range(0, len(later), 1000):
        client.hdel(key, *later[i : i + 1000])
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= steps - 2]
    log.write_text("".join(line + "\n" for line in kept))
    return memory, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    print(
        "| trained samples | marks: hash MB | marks: per step MB | ratio | resume: hash s | resume: per step s "
        "| ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with LocalRedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        client = connect_redis(server.url)
        for samples in args.samples:
            hash_memory, hash_resume = run_hash(client, samples, Path(tmp))
            memory, resume = run_intake(client, samples, Path(tmp))
            print(
                f"| {samples:,} | {hash_memory / 2**20:.2f} | {memory / 2**20:.3f} | {memory / hash_memory:.4f} "
                f"| {hash_resume:.3f} | {resume:.4f} | {resume / hash_resume:.4f} |",
                flush=True,
            )
            client.flushdb()


if __name__ == "__main__":
    main()
