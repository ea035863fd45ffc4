"""Where a run's start-up goes, and start-up against per-step time.

Runs `gkd-async run` on configs/default.yaml for a few steps and reads, from the stage logs and the metrics,
when each stage had started (its "worker started" line), when the learner had finished its first step, and
the steps after. Alone, for comparison, in fresh processes: the private redis-server, a local Ray, and the
imports every stage process pays (torch, transformers). Each figure is the median of `--repeats` runs.

    .venv/bin/python benchmarks/bench_startup.py [--steps 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from gkd_async.config import load_config  # noqa: E402
from gkd_async.local_redis import LocalRedisServer  # noqa: E402
from gkd_async.metrics import read_metrics  # noqa: E402
from workers.launcher import init_ray, run_pipeline, stop_ray  # noqa: E402


def first_event(log_dir: Path, prefix: str, event: str) -> float:
    """Epoch seconds of the first `event` line in the logs of one role."""
    times = []
    for path in log_dir.glob(f"{prefix}*.log"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == event:
                times.append(datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp())
                break
    return min(times)


def one_run(steps: int) -> dict[str, float]:
    logdir = tempfile.mkdtemp(prefix="gkd-bench-startup-")
    cfg = load_config("configs/default.yaml", [f"trainer.total_steps={steps}", f"logging.dir={logdir}"])
    start = time.time()
    summary = run_pipeline(cfg)
    wall = time.time() - start
    logs = Path(summary["run_dir"]) / "logs"
    metrics = [m for m in read_metrics(Path(summary["run_dir"])) if m["training/global_step"] > 0]
    first_step_done = first_event(logs, "learner", "step")
    later = [m["timing/step_s"] for m in metrics[1:]]
    return {
        "rollout worker started": first_event(logs, "rollout", "worker started") - start,
        "teacher scorer started": first_event(logs, "teacher", "worker started") - start,
        "learner ready (before its first step)": first_step_done - metrics[0]["timing/step_s"] - start,
        "first step done": first_step_done - start,
        "per later step": statistics.median(later),
        "whole run": wall,
        "after the last step (checkpoint, final model, shutdown)": wall - (first_step_done - start) - sum(later),
    }


def redis_alone() -> float:
    start = time.perf_counter()
    server = LocalRedisServer().start()
    elapsed = time.perf_counter() - start
    server.stop()
    return elapsed


def ray_alone() -> float:
    start = time.perf_counter()
    init_ray()
    elapsed = time.perf_counter() - start
    stop_ray()
    return elapsed


def imports_alone() -> float:
    code = "import time; t = time.perf_counter(); import torch, transformers; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = [one_run(args.steps) for _ in range(args.repeats)]
    print(f"configs/default.yaml, {args.steps} steps, median of {args.repeats} runs; seconds from the call")
    for key in runs[0]:
        print(f"  {key:<58} {statistics.median(r[key] for r in runs):7.2f}")
    print("alone, in fresh processes:")
    for label, fn in (
        ("redis-server start", redis_alone),
        ("Ray start", ray_alone),
        ("import torch, transformers", imports_alone),
    ):
        print(f"  {label:<58} {statistics.median(fn() for _ in range(args.repeats)):7.2f}")


if __name__ == "__main__":
    main()
