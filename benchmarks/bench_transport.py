"""Scored records through a real Redis (a private local redis-server) next to the codec alone.

For response length 512, k in {0, 64, 256} (0: gkd.teacher_topk=0, only the sampled tokens' log-probs),
float16 and float32 log-probs: records/s and MB/s for encoding,
decoding, writing (XADD) and reading (XREADGROUP + decode + XACK). Ratios are against the codec alone,
measured in the same run.

    .venv/bin/python benchmarks/bench_transport.py [--records N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gkd_async.transport.local_redis import LocalRedisServer
from gkd_async.transport.records import RolloutRecord, ScoredRecord, decode_scored_record, encode_scored_record
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import StreamConsumer, StreamNames, StreamProducer


def make_record(i: int, length: int, k: int, dtype: type, rng: np.random.Generator) -> ScoredRecord:
    rollout = RolloutRecord(
        run_id="bench",
        group_id=f"g{i}",
        sample_ids=[f"g{i}/0"],
        step=i,
        policy_version=0,
        prompt_ids=rng.integers(0, 32000, 64).astype(np.int32),
        response_ids=rng.integers(0, 32000, length).astype(np.int32),
        response_lengths=np.array([length], dtype=np.int32),
        behaviour_logprobs=-rng.random(length).astype(np.float32),
    )
    return ScoredRecord(
        rollout=rollout,
        teacher_id="t0",
        temperature=1.0,
        topk_ids=rng.integers(0, 32000, (length, k)).astype(np.int32),
        topk_logprobs=(-rng.random((length, k)) * 10).astype(dtype),
        token_logprobs=-rng.random(length).astype(np.float32),  # what every teacher scorer sends too
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(url: str, count: int, length: int, k: int, dtype: type) -> dict[str, float]:
    rng = np.random.default_rng(0)
    records = [make_record(i, length, k, dtype, rng) for i in range(8)]
    payloads = [encode_scored_record(records[i % 8]) for i in range(count)]
    size_mb = sum(map(len, payloads)) / 2**20
    encode_s = timed(lambda: [encode_scored_record(records[i % 8]) for i in range(count)])
    decode_s = timed(lambda: [decode_scored_record(p) for p in payloads])

    client = connect_redis(url)
    names = StreamNames(f"bench-{length}-{k}-{np.dtype(dtype).name}")
    client.delete(names.scored)
    producer = StreamProducer(client, names.scored)
    consumer = StreamConsumer(client, names.scored, "learner", "l0", dead_stream=names.dead)
    write_s = timed(lambda: [producer.add([p]) for p in payloads])

    def read_all() -> None:
        seen = 0
        while seen < count:
            entries = consumer.read(count=8, block_ms=1000)
            for entry in entries:
                decode_scored_record(entry.payload)
            consumer.ack([e.id for e in entries])
            seen += len(entries)

    read_s = timed(read_all)
    client.delete(names.scored)
    return {
        "record_kb": size_mb * 1024 / count,
        "codec_mbs": size_mb / (encode_s + decode_s),
        "write_mbs": size_mb / write_s,
        "read_mbs": size_mb / read_s,
        "end_to_end_mbs": size_mb / (encode_s + write_s + read_s),
        "records_s": count / (encode_s + write_s + read_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    print(f"{args.records} scored records of one 512-token response each, local redis-server on loopback")
    header = f"{'k':>4} {'dtype':>8} {'KB/rec':>7} {'codec MB/s':>11} {'XADD MB/s':>10} {'read+ack MB/s':>14}"
    print(header + f" {'e2e MB/s':>9} {'rec/s':>7} {'e2e/codec':>10}")
    with LocalRedisServer(tcp=True) as server:
        for k in (0, 64, 256):  # 0: sampled-token distillation alone, only each token's log-prob
            for dtype in (np.float16, np.float32) if k else (np.float32,):
                r = bench(server.url, args.records, args.length, k, dtype)
                print(
                    f"{k:>4} {np.dtype(dtype).name:>8} {r['record_kb']:7.0f} {r['codec_mbs']:11.0f} "
                    f"{r['write_mbs']:10.0f} {r['read_mbs']:14.0f} {r['end_to_end_mbs']:9.0f} "
                    f"{r['records_s']:7.0f} {r['end_to_end_mbs'] / r['codec_mbs']:10.2f}"
                )


if __name__ == "__main__":
    main()
