"""The demo's claims, end to end on the real pipeline: GKD makes the student better, and so does pure RL."""

import json
from pathlib import Path

import numpy as np
import pytest

from gkd_async.config.loading import load_config
from gkd_async.train.metrics import read_metrics
from workers.commands.demo import DemoSettings, build_task, run_demo, student_warm_start
from workers.launch.run import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_gkd_makes_the_student_better(ray_session, tmp_path):
    """Measured on the project's machine over trainer.seed 0, 1 and 2 (from an empty cache): 99.5%, 99.8% and
    99.5% after GKD from 25.5% before, with the teacher at 98.5%: past the teacher, each batch in 4 optimiser
    steps over 2 epochs (one step a batch: 91.7% on average, 90-91% of the gap). The bar, three quarters of the
    gap, lies below what one step a batch reaches and well below the demo's own; the warm start lands at 25-31%
    over data-order seeds, so the bar holds for a machine whose starting student differs."""
    report = run_demo(tmp_path, DemoSettings(), [], status=lambda msg: None)
    teacher, before = report["teacher_accuracy"], report["student_accuracy_before"]
    after = report["student_accuracy_after"]
    assert teacher >= 0.9
    assert 0.15 <= before <= 0.5, "the warm start missed its target"
    assert (after - before) / (teacher - before) >= 0.75
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [m for m in read_metrics(Path(report["run_dir"])) if "val/reward_mean" in m]
    assert [m["training/global_step"] for m in evals] == list(range(0, 301, 50))
    assert evals[-1]["val/reward_mean"] == pytest.approx(after)


def test_gkd_from_a_teacher_of_another_tokenizer_makes_the_student_better(ray_session, tmp_path):
    """The demo with tiny:teacher-pairs (other ids, two digits a token) and teacher.cross_tokenizer=true.
    Measured on the project's machine (seed 0, from an empty cache): with 2500 supervised teacher steps the
    teacher at 65.0%, the student from 25.5% to 71.8% with the demo's 4 optimiser steps a batch over 2 epochs
    (with one step a batch: 44.0%, the distillation loss of the last 20 steps 0.38 of the first 20's). Held-out
    accuracy first dips as the student takes on the mapped distribution, then climbs."""
    settings = DemoSettings(teacher="tiny:teacher-pairs", teacher_steps=2500)
    report = run_demo(tmp_path, settings, ["teacher.cross_tokenizer=true"], status=lambda msg: None)
    teacher, before = report["teacher_accuracy"], report["student_accuracy_before"]
    after = report["student_accuracy_after"]
    assert teacher >= 0.6
    assert after - before >= 0.15, report
    losses = [m["actor/distill_loss"] for m in read_metrics(Path(report["run_dir"])) if m["training/global_step"] > 0]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])


def test_pure_rl_raises_the_reward(ray_session, tmp_path):
    """RL alone (no teacher), through the pipeline, raises a reward the student can learn in the budget: the
    answer starting with 7. Measured over trainer.seed 0, 1 and 2 (from the warm-started student): the mean
    reward of the first 20 steps 0.20, 0.23 and 0.26, of the last 20 steps 0.998, 0.998 and 0.996. The bar,
    +0.35, is about half the smallest gain.

    The demo's exact-match reward cannot carry this test: RL alone barely moves the warm-started student
    (the quality experiment: 27.8% to 32.2% in 150 steps, over three seeds)."""
    settings = DemoSettings()
    train, _ = build_task(tmp_path, settings)
    student = student_warm_start(train, settings, print)
    reward = tmp_path / "sevens.py"
    reward.write_text(
        "def starts_with_seven(prompt, response, **extra):\n"
        "    return 1.0 if response.strip().startswith('7') else 0.0\n"
    )
    cfg = load_config(
        None,
        [
            f"model.student={student}",
            f"model.teacher={student}",
            f"data.train_files=[{train}]",
            f"custom_reward_function.path={reward}",
            "custom_reward_function.name=starts_with_seven",
            "gkd.enable_teacher=false",
            "gkd.use_rl_loss=true",
            "gkd.rl_loss_coef=1.0",
            "gkd.distill_loss_coef=0",
            "rollout.n=8",
            "rollout.temperature=1.0",
            "rollout.max_new_tokens=4",
            "trainer.train_batch_size=8",
            "trainer.ppo_micro_batch_size_per_gpu=64",
            "trainer.total_steps=100",
            "trainer.lr=1e-3",
            "trainer.warmup_steps=10",
            "logging.tensorboard=false",
            f"logging.dir={tmp_path / 'runs'}",
        ],
    )
    summary = run_pipeline(cfg)
    metrics = read_metrics(Path(summary["run_dir"]))
    rewards = [m["reward/mean"] for m in metrics if "reward/mean" in m]
    assert len(rewards) == 100 and all("actor/pg_loss" in m for m in metrics if m["training/global_step"] > 0)
    assert np.mean(rewards[-20:]) > np.mean(rewards[:20]) + 0.35
