"""Checks across keys that a single field's validation cannot make: each error names the keys and where their
values came from.
"""

from __future__ import annotations

from collections.abc import Mapping

from gkd_async.config.base import TEACHER_NAME
from gkd_async.config.plan import RunPlan
from gkd_async.config.schema import GKDConfig
from gkd_async.errors import ConfigError


def _source_of(key: str, sources: Mapping[str, str]) -> str:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found:
            return found
    deeper = [source for name, source in sources.items() if name.startswith(key + ".")]
    return deeper[0] if deeper else "the default"


def _check_consistency(config: GKDConfig, sources: Mapping[str, str]) -> None:
    gkd = config.gkd
    _check_teachers(config)
    for key in ("teacher_ip", "teacher_port"):
        if getattr(gkd, key) is not None:
            raise ConfigError(
                f"gkd.{key} (from {_source_of('gkd.' + key, sources)}) is not used by gkd-async: the teacher "
                "is a worker that reads and writes Redis streams. Remove it; to use a teacher on another "
                "machine set pipeline.redis_url=redis://HOST:PORT and start it there with "
                "'gkd-async worker teacher --config CONFIG --redis-url redis://HOST:PORT'."
            )
    plan = RunPlan.of(config)
    distill_on, rl_on, opd_on = plan.distill_on, plan.rl_on, plan.opd_on
    _check_topk_source(config, sources)
    _check_teacher_signal(config, sources)
    no_topk = gkd.teacher_topk == 0 and gkd.topk_source == "teacher" and gkd.teacher_signal == "topk"
    if gkd.enable_teacher and gkd.distill_loss_coef > 0 and no_topk:
        raise ConfigError(
            "gkd.teacher_topk=0 sends no top-k log-probs, so the top-k distillation loss "
            f"(gkd.distill_loss_coef={gkd.distill_loss_coef}) has nothing to work on. For sampled-token "
            "distillation alone set gkd.distill_loss_coef=0 gkd.opd_coef=1; to mix both, set gkd.teacher_topk>0."
        )
    if gkd.opd_coef > 0 and not gkd.enable_teacher:
        raise ConfigError("gkd.opd_coef>0 distils from the teacher's log-probs: it needs gkd.enable_teacher=true")
    if config.teacher.backend == "openai" and gkd.enable_teacher and gkd.distill_temperature != 1.0:
        raise ConfigError(
            f"gkd.distill_temperature={gkd.distill_temperature} with teacher.backend=openai: a server returns "
            "prompt log-probs of the raw logits, and tempered ones cannot be recovered from a top-k. Use "
            "gkd.distill_temperature=1.0, or a teacher in the scorer's process (teacher.backend=hf or vllm)"
        )
    _check_dataset_source(config)
    _check_launcher(config, sources)
    if config.teacher.share_prompts and config.teacher.backend != "hf":
        raise ConfigError(
            f"teacher.share_prompts=true is how the hf teacher prefills a prompt once per group; teacher.backend="
            f"{config.teacher.backend} (from {_source_of('teacher.backend', sources)}) schedules its own prefill: "
            "set teacher.backend=hf or drop teacher.share_prompts"
        )
    if config.teacher.cross_tokenizer and (opd_on or config.teacher.backend == "openai"):
        raise ConfigError(
            "teacher.cross_tokenizer=true maps the teacher's top-k onto the student's tokens; it works with the "
            "top-k loss and teacher.backend=hf or vllm, not with sampled-token distillation (gkd.opd_coef: the "
            "teacher has no log-prob of a student token) or a served teacher"
        )
    if opd_on and not plan.on_policy:
        raise ConfigError(
            f"gkd.opd_coef>0 with rollout.source={config.rollout.source}: sampled-token distillation scores the "
            "student's own samples; use rollout.source=student"
        )
    if config.pipeline.stale_policy == "reweight" and not plan.on_policy:
        raise ConfigError(
            f"pipeline.stale_policy=reweight with rollout.source={config.rollout.source}: only the student's own "
            "samples have a staleness (a policy version) to correct; use rollout.source=student or "
            "pipeline.stale_policy=drop"
        )
    if not distill_on and not rl_on and not opd_on:
        raise ConfigError(
            "nothing to train: the distillation loss is off (gkd.enable_teacher=false or "
            "gkd.distill_loss_coef=0), the RL loss is off (gkd.use_rl_loss=false or gkd.rl_loss_coef=0) and "
            "sampled-token distillation is off (gkd.opd_coef=0). Set gkd.distill_loss_coef>0, gkd.opd_coef>0, "
            "or gkd.use_rl_loss=true with gkd.rl_loss_coef>0."
        )
    # Sync mode is max_staleness 0: settle that first, so that every check below sees the bound in force.
    if config.pipeline.mode == "sync" and config.pipeline.max_staleness != 0:
        # An override of the mode wins over a staleness from the file; at the same level they conflict.
        staleness_source = sources.get("pipeline.max_staleness", "")
        if _precedence(staleness_source) >= _precedence(_source_of("pipeline.mode", sources)):
            raise ConfigError(
                f"pipeline.max_staleness={config.pipeline.max_staleness} (from {staleness_source}) contradicts "
                "pipeline.mode=sync, which trains only on samples of the current policy; drop it or use "
                "pipeline.mode=async"
            )
        config.pipeline.max_staleness = 0
    sync_every, staleness = config.trainer.sync_every, config.pipeline.max_staleness
    if sync_every > staleness + 1:
        raise ConfigError(
            f"trainer.sync_every={sync_every} with pipeline.max_staleness={staleness} (pipeline.mode="
            f"{config.pipeline.mode}) would stall: rollouts for a step need weights at most max_staleness "
            f"versions old, but weights are published only every sync_every steps. Use sync_every <= "
            f"{staleness + 1} or raise max_staleness."
        )
    if rl_on and config.custom_reward_function.path is None:
        raise ConfigError(
            "gkd.use_rl_loss=true needs a reward: set custom_reward_function.path=path/to/reward.py "
            "and custom_reward_function.name=your_function"
        )
    if rl_on and config.rollout.n < 2:
        raise ConfigError(
            f"gkd.use_rl_loss=true with rollout.n={config.rollout.n} (from {_source_of('rollout.n', sources)}) "
            "trains nothing: advantages are relative to the other samples of the same prompt, so a group of one "
            "has none. Set rollout.n=4 (or more), lowering trainer.train_batch_size to keep the samples per step."
        )
    if config.trainer.eval_every and (not config.data.val_files or config.custom_reward_function.path is None):
        raise ConfigError(
            f"trainer.eval_every={config.trainer.eval_every} scores data.val_files with the reward function: "
            "set data.val_files and custom_reward_function.path, or trainer.eval_every=0"
        )


def _check_topk_source(config: GKDConfig, sources: Mapping[str, str]) -> None:
    """gkd.topk_source=student or union: the rollout records the student's top-k ids, the HF teacher gathers its
    log-probs there (vLLM and a served teacher return their own top-k only)."""
    source = config.gkd.topk_source
    if source == "teacher" or not config.gkd.enable_teacher:
        return
    why = f"gkd.topk_source={source} (from {_source_of('gkd.topk_source', sources)})"
    if config.rollout.student_topk == 0:
        raise ConfigError(f"{why} needs the student's top-k ids: set rollout.student_topk (e.g. 16)")
    if config.rollout.source != "student":
        raise ConfigError(f"{why} takes the student's top-k from its own rollouts: use rollout.source=student")
    if config.rollout.backend != "hf":
        raise ConfigError(
            f"{why}: the vllm rollout engine does not record the student's top-k ids; use rollout.backend=hf"
        )
    if config.teacher.backend != "hf" or config.teacher.cross_tokenizer:
        raise ConfigError(
            f"{why} needs the teacher's log-probs at the student's ids, which only teacher.backend=hf computes (vLLM "
            "and a served teacher return their own top-k; a teacher of another tokenizer has other ids); use "
            "teacher.backend=hf without teacher.cross_tokenizer, or gkd.topk_source=teacher"
        )


def _check_teacher_signal(config: GKDConfig, sources: Mapping[str, str]) -> None:
    """gkd.teacher_signal=hidden: an HF teacher of the student's tokenizer sends its hidden states for the student's
    own samples, and the learner's fused head turns them into the teacher's logits."""
    if config.gkd.teacher_signal != "hidden" or not config.gkd.enable_teacher:
        return
    why = f"gkd.teacher_signal=hidden (from {_source_of('gkd.teacher_signal', sources)})"
    if config.teacher.backend != "hf":
        raise ConfigError(
            f"{why} needs the teacher's last hidden states, which only teacher.backend=hf returns (vLLM and a served "
            f"teacher return log-probs), not teacher.backend={config.teacher.backend}: use teacher.backend=hf or "
            "gkd.teacher_signal=topk"
        )
    reasons = {
        "teacher.cross_tokenizer=true": config.teacher.cross_tokenizer,  # another vocabulary: no logits to compare
        f"gkd.topk_source={config.gkd.topk_source}": config.gkd.topk_source != "teacher",  # already the whole vocab
        "model.teachers": bool(config.model.teachers),  # one output layer on the learner
        f"rollout.source={config.rollout.source}": not RunPlan.of(config).rollouts_run,  # a scored set holds top-k
        "trainer.fused_lm_head=false": not config.trainer.fused_lm_head,  # the teacher's logits chunk by chunk
    }
    clashes = [key for key, clash in reasons.items() if clash]
    if clashes:
        raise ConfigError(
            f"{why} distils over the whole shared vocabulary from one teacher's hidden states and output layer, "
            f"chunk by chunk in the learner's fused head; it does not combine with {', '.join(clashes)}: drop "
            f"{'it' if len(clashes) == 1 else 'them'}, or use gkd.teacher_signal=topk"
        )


def _check_launcher(config: GKDConfig, sources: Mapping[str, str]) -> None:
    pipeline = config.pipeline
    if pipeline.launcher != "threads":
        if pipeline.weight_transport == "in_process":
            raise ConfigError(
                f"pipeline.weight_transport=in_process (from {_source_of('pipeline.weight_transport', sources)}) "
                "hands the weights over inside one process, and pipeline.launcher="
                f"{pipeline.launcher} runs the stages in processes of their own: use pipeline.launcher=threads, or "
                "pipeline.weight_transport=redis"
            )
        return
    why = f"pipeline.launcher=threads (from {_source_of('pipeline.launcher', sources)}) runs every stage in one process"
    if pipeline.num_learner_ranks > 1:
        raise ConfigError(
            f"{why}, so it has one learner rank, not pipeline.num_learner_ranks={pipeline.num_learner_ranks}: "
            "use pipeline.launcher=ray for several ranks, or pipeline.num_learner_ranks=1"
        )
    if pipeline.weight_transport == "ray":
        raise ConfigError(
            f"{why}, without Ray, so pipeline.weight_transport=ray has no object store: use "
            "pipeline.weight_transport=in_process (the default here) or redis, or pipeline.launcher=ray"
        )
    plan = RunPlan.of(config)
    engines = {"rollout": plan.rollouts_run, "teacher": plan.teachers_score}  # the stages that run an engine
    vllm = [
        f"{stage}.backend=vllm" for stage, runs in engines.items() if runs and getattr(config, stage).backend == "vllm"
    ]
    if vllm:
        raise ConfigError(
            f"{why}, and {' and '.join(vllm)} cannot share one: an in-process vLLM engine keeps process-wide "
            "state (its parallel groups on torch.distributed, which the learner uses too). Use "
            "pipeline.launcher=ray with vLLM engines, or the hf backends"
        )
    if config.ray.address is not None:
        raise ConfigError(
            f"{why}, without Ray, so ray.address={config.ray.address} would be ignored: drop one of the two"
        )


def _check_teachers(config: GKDConfig) -> None:
    teachers, key = config.model.teachers, config.data.teacher_key
    if not teachers and key is None:
        return
    if not teachers or key is None:
        raise ConfigError(
            "several teachers need both model.teachers (name -> model) and data.teacher_key (the data field naming "
            f"each prompt's teacher); got model.teachers={teachers or '{}'} and data.teacher_key={key}"
        )
    bad = [name for name in teachers if not TEACHER_NAME.fullmatch(name)]
    if bad:
        raise ConfigError(
            f"model.teachers names {bad} are not plain names: use letters, digits, '_', '-' and '.' (they become "
            "stream keys and metric names)"
        )
    if not config.gkd.enable_teacher:
        raise ConfigError("model.teachers is set but gkd.enable_teacher=false: enable the teacher or drop the teachers")
    if not RunPlan.of(config).on_policy:
        raise ConfigError(
            f"model.teachers with rollout.source={config.rollout.source}: routing sends the student's samples to "
            "each prompt's teacher; supervised KD samples from model.teacher alone"
        )


def _check_dataset_source(config: GKDConfig) -> None:
    gkd = config.gkd
    if RunPlan.of(config).rollouts_run:
        if config.data.scored_dir is not None:
            raise ConfigError(
                f"data.scored_dir={config.data.scored_dir} is read only with rollout.source=dataset; set that, or "
                "drop data.scored_dir"
            )
        return
    if config.data.scored_dir is None:
        raise ConfigError(
            "rollout.source=dataset trains on a scored data set: set data.scored_dir to the directory that "
            "`gkd-async score DATA.jsonl --out DIR` wrote"
        )
    if not gkd.enable_teacher or gkd.distill_loss_coef == 0:
        raise ConfigError(
            "rollout.source=dataset distils from the teacher's stored top-k: it needs gkd.enable_teacher=true and "
            "gkd.distill_loss_coef>0"
        )
    if gkd.use_rl_loss or gkd.opd_coef > 0:
        raise ConfigError(
            "rollout.source=dataset trains on fixed responses, which the student did not sample: the RL loss and "
            "sampled-token distillation need the student's own samples; set gkd.use_rl_loss=false gkd.opd_coef=0"
        )
    if config.model.teachers:
        raise ConfigError("rollout.source=dataset with model.teachers: a scored data set holds its teacher's scores")


def _precedence(source: str) -> int:
    return 2 if source.startswith("override") else 1 if source.startswith("file") else 0
