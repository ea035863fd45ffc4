import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gkd_async.config.loading import dump_config, load_config
from gkd_async.config.schema import GKDConfig, valid_keys
from gkd_async.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_seed_keys_have_the_seed_defaults():
    gkd = load_config().gkd
    assert gkd.enable_teacher is True
    assert gkd.teacher_topk == 256
    assert gkd.distill_loss_coef == 1.0
    assert gkd.distill_loss_type == "forward_kl"
    assert gkd.distill_temperature == 1.0
    assert gkd.use_rl_loss is False
    assert gkd.rl_loss_coef == 0.0


def test_seed_oom_knobs_and_reward_keys_exist():
    keys = set(valid_keys())
    for key in (
        "trainer.ppo_micro_batch_size_per_gpu",
        "trainer.ppo_max_token_len_per_gpu",
        "trainer.param_offload",
        "trainer.optimizer_offload",
        "custom_reward_function.path",
        "custom_reward_function.name",
    ):
        assert key in keys


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "gkd:\n  distill_loss_type: jsd\n  distill_loss_coef: 0.5\ntrainer:\n  lr: 0.1\n")
    cfg = load_config(path, ["gkd.distill_loss_type=reverse_kl", "trainer.lr=1e-5", "rollout.n=8"])
    assert cfg.gkd.distill_loss_type == "reverse_kl"
    assert cfg.gkd.distill_loss_coef == 0.5
    assert cfg.trainer.lr == pytest.approx(1e-5)
    assert cfg.rollout.n == 8


def test_samples_per_prompt_default_to_one_without_rl_and_a_group_with_it():
    reward = "custom_reward_function.path=reward.py"
    assert load_config().rollout.n == 1
    assert load_config(None, ["gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.1", reward]).rollout.n == 4
    assert load_config(None, ["gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.0"]).rollout.n == 1  # RL weighted 0: off
    assert load_config(None, ["rollout.n=3"]).rollout.n == 3
    resolved = load_config(None, ["gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.1", reward])
    assert yaml.safe_load(dump_config(resolved))["rollout"]["n"] == 4  # config.yaml (and resume) keeps the number


def test_unknown_key_names_key_source_and_nearest(tmp_path):
    path = write(tmp_path, "gkd:\n  distill_los_type: jsd\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "gkd.distill_los_type" in msg and str(path) in msg and "did you mean gkd.distill_loss_type" in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["gkdd.teacher_topk=4"])
    assert "gkdd" in str(err.value) and "did you mean gkd" in str(err.value)


def test_wrong_type_and_out_of_range_name_the_override():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.total_steps=abc", "gkd.distill_temperature=0"])
    msg = str(err.value)
    assert "trainer.total_steps = 'abc' (from override 'trainer.total_steps=abc')" in msg
    assert "gkd.distill_temperature = 0" in msg and "greater than 0" in msg


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["gkd.distill_loss_type=kl"])
    assert "'forward_kl', 'reverse_kl' or 'jsd'" in str(err.value)


@pytest.mark.parametrize("override", ["gkd.distill_loss_type", "=3", "trainer.lr.x=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override in str(err.value)


def test_seed_teacher_address_keys_say_what_to_set_instead(tmp_path):
    path = write(tmp_path, "gkd:\n  teacher_ip: 127.0.0.1\n  teacher_port: 15555\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "gkd.teacher_ip" in msg and "pipeline.redis_url" in msg and "gkd-async worker teacher" in msg


def test_nothing_to_train_is_an_error():
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(None, ["gkd.distill_loss_coef=0"])
    assert load_config(None, ["gkd.distill_loss_coef=0", "gkd.opd_coef=1", "gkd.teacher_topk=0"]).gkd.opd_coef == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["gkd.teacher_topk=0"], "teacher_topk=0 sends no top-k .* set gkd.distill_loss_coef=0 gkd.opd_coef=1"),
        (["gkd.opd_coef=1", "gkd.enable_teacher=false"], "needs gkd.enable_teacher=true"),
        (["gkd.opd_coef=1", "rollout.source=teacher"], "scores the student's own samples"),
    ],
)
def test_sampled_token_distillation_misuse_says_what_to_set(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_shared_prompts_are_the_hf_teachers_and_say_so_elsewhere():
    assert load_config(None, ["teacher.share_prompts=true"]).teacher.share_prompts
    with pytest.raises(ConfigError, match=r"teacher.backend=vllm \(from override .*\) schedules its own prefill"):
        load_config(None, ["teacher.share_prompts=true", "teacher.backend=vllm"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pipeline.num_learner_ranks=2"], r"one learner rank, not pipeline.num_learner_ranks=2"),
        (["pipeline.weight_transport=ray"], r"pipeline.weight_transport=ray has no object store"),
        (["rollout.backend=vllm"], r"rollout.backend=vllm cannot share one"),
        (["teacher.backend=vllm"], r"teacher.backend=vllm cannot share one"),
        (["ray.address=10.0.0.1:6379"], r"ray.address=10.0.0.1:6379 would be ignored"),
    ],
)
def test_what_the_threads_launcher_cannot_run_is_refused_with_the_way_out(overrides, message):
    threads = "pipeline.launcher=threads"
    with pytest.raises(ConfigError, match=r"pipeline.launcher=threads \(from override .*\) runs every stage in one"):
        load_config(None, [threads, *overrides])
    with pytest.raises(ConfigError, match=message):
        load_config(None, [threads, *overrides])
    assert load_config(None, overrides).pipeline.launcher == "ray"  # the same keys under Ray are fine


def test_the_weight_transport_defaults_to_in_process_in_one_process_and_to_redis_across_processes():
    assert load_config(None, ["pipeline.launcher=threads"]).pipeline.weight_transport == "in_process"
    assert load_config(None, []).pipeline.weight_transport == "redis"
    assert (
        load_config(None, ["pipeline.launcher=threads", "pipeline.weight_transport=file"]).pipeline.weight_transport
        == "file"
    )
    with pytest.raises(ConfigError, match=r"weight_transport=in_process \(from override .*\) hands the weights over"):
        load_config(None, ["pipeline.weight_transport=in_process"])


def test_the_threads_launcher_minds_only_the_engines_that_will_run():
    """No teacher scorer starts without a teacher, so its backend is not the threads launcher's concern."""
    cfg = ["pipeline.launcher=threads", "teacher.backend=vllm", "gkd.enable_teacher=false"]
    cfg += ["gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.1", "custom_reward_function.path=reward.py"]
    assert load_config(None, cfg).pipeline.launcher == "threads"
    with pytest.raises(ConfigError, match="rollout.backend=vllm cannot share one"):
        load_config(None, [*cfg, "rollout.backend=vllm"])


def test_rl_needs_a_reward_function():
    with pytest.raises(ConfigError, match="custom_reward_function.path"):
        load_config(None, ["gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.1"])


def test_rl_needs_groups_of_more_than_one_sample():
    reward = ["custom_reward_function.path=reward.py", "gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.1"]
    with pytest.raises(ConfigError, match=r"rollout.n=1 \(from override 'rollout.n=1'\).*a group of one"):
        load_config(None, [*reward, "rollout.n=1"])
    assert load_config(None, [*reward, "rollout.n=2"]).rollout.n == 2


def test_sync_mode_means_zero_staleness():
    assert load_config(None, ["pipeline.mode=sync"]).pipeline.max_staleness == 0
    with pytest.raises(ConfigError, match="contradicts pipeline.mode=sync"):
        load_config(None, ["pipeline.mode=sync", "pipeline.max_staleness=2"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "gkd: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    assert isinstance(load_config(path), GKDConfig)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_config_show_prints_the_resolved_config():
    result = run_cli("config", "show", "gkd.distill_loss_type=jsd", "pipeline.num_teacher_scorers=3")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["gkd"]["distill_loss_type"] == "jsd"
    assert shown["pipeline"]["num_teacher_scorers"] == 3
    assert shown["gkd"]["teacher_topk"] == 256


def test_cli_config_error_is_a_message_not_a_traceback():
    result = run_cli("config", "show", "gkd.distil_loss_coef=2")
    assert result.returncode == 2
    assert "did you mean gkd.distill_loss_coef" in result.stderr
    assert "Traceback" not in result.stderr


def test_sync_every_beyond_the_staleness_bound_would_stall():
    with pytest.raises(ConfigError, match="sync_every <= 2"):
        load_config(None, ["pipeline.max_staleness=1", "trainer.sync_every=3"])
    assert load_config(None, ["pipeline.max_staleness=1", "trainer.sync_every=2"]).trainer.sync_every == 2


def test_sync_mode_with_sync_every_2_is_refused_not_stalled():
    with pytest.raises(ConfigError, match="pipeline.max_staleness=0 .*would stall"):
        load_config(None, ["pipeline.mode=sync", "trainer.sync_every=2"])


def test_a_mode_override_wins_over_the_files_staleness(tmp_path):
    path = write(tmp_path, "pipeline:\n  mode: async\n  max_staleness: 2\n")
    assert load_config(path, ["pipeline.mode=sync"]).pipeline.max_staleness == 0
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(write(tmp_path, "pipeline:\n  mode: sync\n  max_staleness: 2\n"))


def test_warmup_as_a_ratio_and_a_cosine_floor():
    from gkd_async.train.fsdp import lr_multiplier

    t = load_config(None, ["trainer.total_steps=100", "trainer.warmup_ratio=0.05"]).trainer
    assert t.warmup == 5 and load_config(None, ["trainer.warmup_steps=7"]).trainer.warmup == 7
    assert [lr_multiplier(s, t.warmup, 100, "constant") for s in (0, 4, 50)] == [0.2, 1.0, 1.0]
    ends = [lr_multiplier(s, 0, 100, "cosine", 0.1) for s in (0, 50, 100)]
    assert ends == pytest.approx([1.0, 0.55, 0.1])  # from lr down to min_lr_ratio x lr, halfway at the middle
    with pytest.raises(ConfigError, match="trainer.warmup_steps or trainer.warmup_ratio, not both"):
        load_config(None, ["trainer.warmup_steps=3", "trainer.warmup_ratio=0.1"])


@pytest.mark.parametrize(("beta", "loss"), [(0, "forward_kl"), (1, "reverse_kl"), (0.5, "jsd")])
def test_jsd_beta_at_0_and_1_is_the_pure_kl_as_trl_reads_it(beta, loss):
    assert load_config(None, ["gkd.distill_loss_type=jsd", f"gkd.jsd_beta={beta}"]).gkd.distill_loss_type == loss
    assert load_config(None, [f"gkd.jsd_beta={beta}"]).gkd.distill_loss_type == "forward_kl"  # other types unchanged


def test_the_run_plan_works_out_each_derived_fact_in_one_place():
    """RunPlan: loss terms, on-policy, which teacher scorers run (several teachers in sorted order, for the
    launchers and the learner's liveness alike) and the steps that publish, evaluate and save."""
    from gkd_async.config.plan import RunPlan
    from workers.launch.base import worker_stages

    plan = RunPlan.of(load_config(None, []))
    assert (plan.distill_on, plan.rl_on, plan.opd_on, plan.on_policy, plan.teachers_score) == (
        True, False, False, True, True
    )  # fmt: skip
    assert plan.teacher_roles == (None,)
    opd = RunPlan.of(load_config(None, ["gkd.distill_loss_coef=0", "gkd.teacher_topk=0", "gkd.opd_coef=1"]))
    assert (opd.distill_on, opd.opd_on, opd.topk, plan.topk) == (False, True, 0, 256)
    reward = [
        f"custom_reward_function.path={REPO / 'gkd_async/rewards/functions.py'}",
        "custom_reward_function.name=exact_match",
    ]
    rl_only = ["gkd.enable_teacher=false", "gkd.use_rl_loss=true", "gkd.rl_loss_coef=1", *reward]
    assert RunPlan.of(load_config(None, rl_only)).topk == 0
    assert (
        plan.weights_streamed,
        RunPlan.of(load_config(None, ["pipeline.weight_transport=file"])).weights_streamed,
    ) == (True, False)
    teachers = ["model.teachers.math=tiny:teacher", "model.teachers.chat=tiny:student", "data.teacher_key=domain"]
    cfg = load_config(None, [*teachers, "pipeline.num_teacher_scorers=2"])
    assert RunPlan.of(cfg).teacher_roles == ("chat", "math")
    assert [stage for stage in worker_stages(cfg) if stage[0] == "teacher"] == [
        ("teacher", "chat-0", "chat"), ("teacher", "chat-1", "chat"), ("teacher", "math-0", "math"),
        ("teacher", "math-1", "math"),
    ]  # fmt: skip
    steps_of = ["trainer.total_steps=10", "trainer.sync_every=3", "pipeline.max_staleness=3", "trainer.eval_every=4"]
    scored = ["data.val_files=[tiny:addition]", *reward]
    due = RunPlan.of(load_config(None, [*steps_of, *scored, "checkpoint.save_every=5"]))
    steps = range(11)
    assert [s for s in steps if due.publish_due(s)] == [0, 3, 6, 9, 10]
    assert [s for s in steps if due.evaluate_due(s)] == [0, 4, 8, 10]
    assert [s for s in steps if due.save_due(s)] == [0, 5, 10]
    assert (plan.update_groups, plan.ppo_epochs) == (4, 1)  # the whole batch, one optimiser step
    minis = RunPlan.of(load_config(None, ["trainer.train_batch_size=8", "trainer.ppo_mini_batch_size=2"]))
    assert minis.update_groups == 2
    assert RunPlan.of(load_config(None, ["trainer.ppo_mini_batch_size=2", "trainer.ppo_epochs=3"])).ppo_epochs == 3
    from gkd_async.config.plan import Staleness

    stale = RunPlan.of(load_config(None, ["pipeline.stale_policy=reweight", "pipeline.max_staleness=2"]))
    verdicts = [stale.staleness(5, version).name for version in (6, 5, 3, 2, 0)]
    assert verdicts == ["DROPPED", "FRESH", "FRESH", "REWEIGHTED", "REWEIGHTED"]  # a version past the learner: dropped
    assert [plan.staleness(5, version) for version in (4, 3)] == [Staleness.FRESH, Staleness.DROPPED]
    teacher_samples = ["pipeline.stale_policy=reweight", "rollout.source=teacher"]
    assert RunPlan.of(load_config(None, ["rollout.source=teacher"])).staleness(5, 0) is Staleness.FRESH
    with pytest.raises(ConfigError, match="stale_policy=reweight with rollout.source=teacher: only the student's"):
        load_config(None, teacher_samples)
    union = ["gkd.topk_source=union", "rollout.student_topk=16", "gkd.teacher_topk=64"]
    both = RunPlan.of(load_config(None, union))
    assert (both.topk, both.teacher_topk, both.student_topk) == (80, 64, 16)  # side by side in each record
    assert both.student_ids_scored and not plan.student_ids_scored
    own = RunPlan.of(load_config(None, [*union[1:], "gkd.topk_source=student"]))
    assert (own.topk, own.teacher_topk, own.distill_on) == (16, 0, True)
    with pytest.raises(ConfigError, match=r"gkd.topk_source=union \(from override .*\) needs the student's top-k"):
        load_config(None, union[:1])
    with pytest.raises(ConfigError, match="which only teacher.backend=hf computes"):
        load_config(None, [*union, "teacher.backend=vllm"])
    hidden = RunPlan.of(load_config(None, ["gkd.teacher_signal=hidden", "gkd.teacher_topk=0"]))
    assert (hidden.topk, hidden.teacher_topk, hidden.distill_on, hidden.hidden_signal) == (0, 0, True, True)
    assert not plan.hidden_signal
    refused = r"teacher_signal=hidden \(from override .*\) needs .* not teacher.backend=vllm"
    with pytest.raises(ConfigError, match=refused):
        load_config(None, ["gkd.teacher_signal=hidden", "teacher.backend=vllm"])
    clash = "does not combine with gkd.topk_source=union, trainer.fused_lm_head=false: drop them, or use gkd.teacher"
    with pytest.raises(ConfigError, match=clash):
        load_config(None, ["gkd.teacher_signal=hidden", *union, "trainer.fused_lm_head=false"])
    with pytest.raises(ConfigError, match=r"ppo_mini_batch_size=3 does not divide trainer.train_batch_size=4; set"):
        load_config(None, ["trainer.ppo_mini_batch_size=3"])
