"""Steps per second of the Redis pipeline, sync and async, HF and vLLM engines, against an in-process loop
doing the same computation with HF (generate, score, train, hand the weights over) with no Redis, no Ray
and no overlap.

The first step of each run (start-up, first weights) is left out. Printed as ratios against the in-process
loop measured in the same run, with the learner's wait fraction and a per-stage time breakdown.

    .venv/bin/python benchmarks/bench_pipeline.py [--steps N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gkd_async.config.loading import load_config
from gkd_async.config.schema import GKDConfig
from gkd_async.data.cursor import PromptCursor
from gkd_async.data.prompts import load_prompts
from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine  # noqa: E402
from gkd_async.models.loading import load_model, load_tokenizer
from gkd_async.train.batching import TrainSample
from gkd_async.train.checkpoint import full_state_dict
from gkd_async.train.fsdp import shard_model
from gkd_async.train.metrics import read_metrics
from gkd_async.train.step import train_step
from workers.common import group_seed  # noqa: E402
from workers.launch.run import run_pipeline  # noqa: E402

VLLM = ["rollout.backend=vllm", "teacher.backend=vllm"]


def in_process_step_times(cfg: GKDConfig, steps: int) -> list[float]:
    torch.set_num_threads(1)
    init = tempfile.mktemp(prefix="gkd-bench-init-")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    tok = load_tokenizer(cfg.model.student)
    rollout = HFRolloutEngine(cfg.model.student, "float32", tok.pad_token_id, tok.eos_token_id)
    teacher = HFTeacherEngine(cfg.model.teacher, "float32", tok.pad_token_id)
    model = shard_model(load_model(cfg.model.student), cfg.model.dtype, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    prompts = load_prompts(cfg.data.train_files, tok, cfg.data)
    cursor = PromptCursor(len(prompts), cfg.data.shuffle, cfg.data.seed)
    r, k = cfg.rollout, cfg.gkd.teacher_topk
    times = []
    for step in range(steps):
        start = time.perf_counter()
        samples = []
        groups = [cursor.next() for _ in range(cfg.trainer.train_batch_size)]
        generated = rollout.generate_groups(
            [prompts[index].ids for _, index in groups],
            [group_seed(cfg.trainer.seed, group_id) for group_id, _ in groups],
            r.n,
            r.temperature,
            r.top_p,
            r.max_new_tokens,
        )
        for (group_id, index), outs in zip(groups, generated, strict=True):
            prompt = prompts[index].ids
            scores = teacher.score(
                [(prompt, o.response_ids) for o in outs], k, cfg.gkd.distill_temperature, cfg.teacher.batch_size
            )
            samples += [
                TrainSample(f"{group_id}/{i}", group_id, step, prompt, o.response_ids, ids, lps, o.logprobs)
                for i, (o, (ids, lps)) in enumerate(zip(outs, scores, strict=True))
            ]
        train_step(model, optimizer, samples, 1, tok.pad_token_id, k, cfg)
        rollout.load_weights(full_state_dict(model), step + 1)
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    return times[1:]


def pipeline_metrics(cfg: GKDConfig) -> list[dict]:
    summary = run_pipeline(cfg)
    return read_metrics(Path(summary["run_dir"]))[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    logdir = tempfile.mkdtemp(prefix="gkd-bench-runs-")
    base = [
        "configs/default.yaml",
        "rollout.n=4",  # the shape the README's figures were measured at: 4 prompts x 4 samples
        "trainer.train_batch_size=4",
        f"trainer.total_steps={args.steps}",
        f"logging.dir={logdir}",
        "logging.tensorboard=false",
    ]
    cfg = load_config(base[0], base[1:])
    baseline = float(np.mean(in_process_step_times(cfg, args.steps)))
    print(
        f"demo size: {cfg.trainer.train_batch_size} prompts x {cfg.rollout.n} samples x "
        f"{cfg.rollout.max_new_tokens} new tokens, top-{cfg.gkd.teacher_topk}, {args.steps} steps (first left out)"
    )
    print(
        f"{'mode':>22} {'s/step':>7} {'steps/s':>8} {'vs in-process':>14} {'wait frac':>10} "
        f"{'generate':>9} {'score':>7} {'train':>7} {'publish':>8}"
    )
    print(f"{'in-process loop':>22} {baseline:7.3f} {1 / baseline:8.2f} {1.0:14.2f} {'-':>10}")
    for label, extra in (
        ("sync (pipeline)", ["pipeline.mode=sync"]),
        ("async, staleness 1", ["pipeline.mode=async", "pipeline.max_staleness=1"]),
        ("async, staleness 2", ["pipeline.mode=async", "pipeline.max_staleness=2", "pipeline.num_rollout_workers=2"]),
        ("sync, OPD k=0", ["pipeline.mode=sync", "gkd.distill_loss_coef=0", "gkd.opd_coef=1", "gkd.teacher_topk=0"]),
        ("sync, vLLM engines", ["pipeline.mode=sync", *VLLM]),
        ("async 1, vLLM engines", ["pipeline.mode=async", "pipeline.max_staleness=1", *VLLM]),
    ):
        metrics = pipeline_metrics(load_config(base[0], [*base[1:], *extra]))
        step_s = float(np.mean([m["timing/step_s"] for m in metrics]))

        def mean(key: str, metrics: list[dict] = metrics) -> float:
            return float(np.mean([m[key] for m in metrics]))

        print(
            f"{label:>22} {step_s:7.3f} {1 / step_s:8.2f} {baseline / step_s:14.2f} "
            f"{mean('perf/learner_wait_fraction'):10.2f} {mean('timing/generate_s'):9.3f} "
            f"{mean('timing/score_s'):7.3f} {mean('timing/train_s'):7.3f} {mean('timing/publish_s'):8.3f}"
        )
    print("generate/score: per prompt group, in the workers; train/publish: per step, in the learner")


if __name__ == "__main__":
    main()
