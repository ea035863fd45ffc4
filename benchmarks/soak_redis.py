"""Redis memory over a long run: `gkd-async run configs/default.yaml` on a private redis-server for N steps
(default 160), printing the server's used_memory and the run's keys every 40 steps.

    .venv/bin/python benchmarks/soak_redis.py [STEPS]

Acknowledged stream entries are trimmed, so memory should stay flat; what still grows is the learner's
de-duplication hash (one field per trained sample).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from gkd_async.config.loading import load_config
from gkd_async.transport.local_redis import LocalRedisServer
from gkd_async.transport.redis_client import connect_redis
from gkd_async.transport.streams import StreamNames
from workers.launch.run import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def main(steps: int) -> None:
    with LocalRedisServer() as server, tempfile.TemporaryDirectory() as runs:
        client = connect_redis(server.url)
        names = StreamNames("soak")
        keys = (names.prompts, names.rollouts, names.scored, names.dead, names.trained)
        seen: dict[int, tuple[int, int]] = {}

        def watch(progress: dict) -> None:
            mark = int(progress.get("training/global_step", 0)) // 40 * 40
            if mark and mark not in seen:
                used = client.info("memory")["used_memory"]
                seen[mark] = (used, sum(client.memory_usage(k) or 0 for k in keys))

        overrides = [
            f"trainer.total_steps={steps}",
            "rollout.n=4",  # the shape the README's figures were measured at: 4 prompts x 4 samples
            "trainer.train_batch_size=4",
            "logging.tensorboard=false",
            f"logging.dir={runs}",
            f"pipeline.redis_url={server.url}",
            "pipeline.run_id=soak",
        ]
        start = time.perf_counter()
        run_pipeline(load_config(REPO / "configs" / "default.yaml", overrides), watch)
        print(f"{steps} steps of configs/default.yaml in {time.perf_counter() - start:.0f} s")
        print("| step | Redis used_memory MB | the run's keys KiB |")
        print("|---|---|---|")
        for mark, (used, run_keys) in sorted(seen.items()):
            print(f"| {mark} | {used / 2**20:.2f} | {run_keys / 1024:.1f} |")
        lengths = [client.xlen(s) for s in (names.prompts, names.rollouts, names.scored)]
        trained = client.hlen(names.trained)
        print(f"stream lengths at the end (prompts, rollouts, scored): {lengths}; trained samples {trained}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 160)
