"""The demo's claims, end to end on the real pipeline: GKD makes the student better, and so does pure RL."""

import json
from pathlib import Path

import numpy as np
import pytest

from gkd_async.config import load_config
from gkd_async.metrics import read_metrics
from workers.demo import REWARD_NAME, REWARD_PATH, DemoSettings, build_task, cached_sft_model, run_demo
from workers.launcher import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_gkd_makes_the_student_better(ray_session, tmp_path):
    report = run_demo(tmp_path, DemoSettings(), [], status=lambda msg: None)
    assert report["teacher_accuracy"] >= 0.9
    assert report["student_accuracy_after"] >= report["student_accuracy_before"] + 0.05
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [m for m in read_metrics(Path(report["run_dir"])) if "val/reward_mean" in m]
    assert [m["training/global_step"] for m in evals] == [0, 50, 100, 150, 200, 250, 300]
    assert evals[-1]["val/reward_mean"] == pytest.approx(report["student_accuracy_after"])


def test_pure_rl_raises_the_reward(ray_session, tmp_path):
    settings = DemoSettings()
    train, heldout = build_task(tmp_path, settings)
    student = cached_sft_model("student", "tiny:student", train, settings.student_sft_steps, settings, print)
    cfg = load_config(
        None,
        [
            f"model.student={student}",
            f"model.teacher={student}",
            f"data.train_files=[{train}]",
            f"data.val_files=[{heldout}]",
            f"custom_reward_function.path={REWARD_PATH}",
            f"custom_reward_function.name={REWARD_NAME}",
            "gkd.enable_teacher=false",
            "gkd.use_rl_loss=true",
            "gkd.rl_loss_coef=1.0",
            "gkd.distill_loss_coef=0",
            "rollout.n=8",
            "rollout.temperature=0.5",
            "rollout.max_new_tokens=4",
            "trainer.train_batch_size=8",
            "trainer.ppo_micro_batch_size_per_gpu=64",
            "trainer.total_steps=300",
            "trainer.lr=3e-4",
            "trainer.warmup_steps=15",
            "trainer.lr_schedule=cosine",
            "trainer.eval_every=300",
            "logging.tensorboard=false",
            f"logging.dir={tmp_path / 'runs'}",
        ],
    )
    summary = run_pipeline(cfg)
    metrics = read_metrics(Path(summary["run_dir"]))
    rewards = [m["reward/mean"] for m in metrics if "reward/mean" in m]
    assert len(rewards) == 300 and all("actor/pg_loss" in m for m in metrics if m["training/global_step"] > 0)
    assert np.mean(rewards[-50:]) > np.mean(rewards[:50]) + 0.03
    evals = [m["val/reward_mean"] for m in metrics if "val/reward_mean" in m]
    assert evals[-1] > evals[0]
