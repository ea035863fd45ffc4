"""Where a run's start-up goes, and start-up against per-step time, for both launchers.

Runs `gkd-async run configs/default.yaml` for a few steps as a command of its own, once with every stage a
Ray actor (`pipeline.launcher=ray`, the default) and once with every stage a thread of the command's process
(`pipeline.launcher=threads`), and reads from the stage logs and the metrics when each stage had started
(its "worker started" line), when the learner had finished its first step, and the steps after; seconds
from the command's start, so the command's own imports count. Alone, for comparison, in fresh processes:
the private redis-server, a local Ray, and the imports every stage process pays (torch, transformers).
Each figure is the median of `--repeats` runs; the last column is threads over ray.

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

from gkd_async.train.metrics import read_metrics
from gkd_async.transport.local_redis import LocalRedisServer
from workers.launch.ray_actors import init_ray, stop_ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("ray", "threads")


def first_event(log_dir: Path, role: str, event: str) -> float:
    """Epoch seconds of the first `event` line logged by a stage of `role` (a file per process under Ray,
    one file for all stages with the threads launcher: each line names its role)."""
    times = []
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("role") == role and record.get("event") == event:
                times.append(datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp())
                break
    return min(times)


def one_run(steps: int, launcher: str) -> dict[str, float]:
    logdir = Path(tempfile.mkdtemp(prefix="gkd-bench-startup-"))
    overrides = [f"trainer.total_steps={steps}", f"logging.dir={logdir}", f"pipeline.launcher={launcher}"]
    overrides += ["rollout.n=4", "trainer.train_batch_size=4"]  # the shape the README's figures were measured at
    command = [str(Path(sys.executable).with_name("gkd-async")), "run", "configs/default.yaml", *overrides]
    start = time.time()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"gkd-async run ({launcher}) failed:\n{proc.stderr[-2000:]}")
    (run_dir,) = [p for p in logdir.iterdir() if (p / "metrics.jsonl").is_file()]
    logs = run_dir / "logs"
    metrics = [m for m in read_metrics(run_dir) if m["training/global_step"] > 0]
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
    runs = {launcher: [] for launcher in LAUNCHERS}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine falls on both
        for launcher in LAUNCHERS:
            runs[launcher].append(one_run(args.steps, launcher))
    print(
        f"gkd-async run configs/default.yaml, {args.steps} steps, median of {args.repeats} runs; seconds from "
        "the command's start"
    )
    print(f"  {'':<58} {'ray':>7} {'threads':>7} {'ratio':>6}")
    for key in runs["ray"][0]:
        ray_s, threads_s = (statistics.median(r[key] for r in runs[launcher]) for launcher in LAUNCHERS)
        print(f"  {key:<58} {ray_s:7.2f} {threads_s:7.2f} {threads_s / ray_s:6.2f}")
    print("alone, in fresh processes:")
    for label, fn in (
        ("redis-server start", redis_alone),
        ("Ray start", ray_alone),
        ("import torch, transformers", imports_alone),
    ):
        print(f"  {label:<58} {statistics.median(fn() for _ in range(args.repeats)):7.2f}")


if __name__ == "__main__":
    main()
