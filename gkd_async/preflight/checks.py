"""Checks that need only the config, local files and a served teacher if there is one, run by `gkd-async run`
before Redis and Ray start, so that a wrong path, size or length is a one-line error in seconds instead of a
stage crash a minute in. The stages run the checks that concern them again when they start (a standalone
worker has no launcher)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gkd_async.config.loading import for_teacher
from gkd_async.config.plan import RunPlan
from gkd_async.config.schema import GKDConfig
from gkd_async.data.prompt import Prompt
from gkd_async.data.prompts import load_prompts
from gkd_async.data.scored_dataset import ScoredDataset
from gkd_async.errors import ConfigError
from gkd_async.logs import get_logger
from gkd_async.models.loading import (
    TOKENIZER_PROBE,
    ModelLoadError,
    check_tokenizers_agree,
    load_tokenizer,
    model_context_length,
    model_vocab_size,
)
from gkd_async.models.lora import check_lora
from gkd_async.rewards.loading import check_reward_takes_fields, load_reward_function

if TYPE_CHECKING:
    from gkd_async.engines.served import ServedTeacherEngine


def uses_local_teacher(config: GKDConfig) -> bool:
    """Whether a stage loads the teacher's files: to score in its own process, or to sample from it."""
    scores = RunPlan.of(config).teachers_score
    return (scores and config.teacher.backend != "openai") or config.rollout.source == "teacher"


def check_teacher_fits_student(config: GKDConfig) -> int:
    """The vocabulary both models share, checked: the teacher's top-k is taken over it.

    Models of one family can pad their output layers differently (Qwen2.5: 151,936 rows for the small
    ones, 152,064 for 7B and up); the padded rows are no tokens, so the HF teacher scores over the shared
    rows. vLLM returns top-k over its whole layer, so there the sizes must match.
    """
    student, teacher = config.model.student, config.model.teacher
    tokenizer = load_tokenizer(student, config.model.trust_remote_code)
    student_rows, teacher_rows = (
        model_vocab_size(student, config.model.trust_remote_code),
        model_vocab_size(teacher, config.model.trust_remote_code),
    )
    if config.teacher.cross_tokenizer:  # the teacher's top-k is mapped onto the student's tokens
        if config.gkd.teacher_topk > min(student_rows, teacher_rows) // 2:
            raise ConfigError(
                f"gkd.teacher_topk={config.gkd.teacher_topk} with teacher.cross_tokenizer: keep it at most half the "
                f"smaller vocabulary ({min(student_rows, teacher_rows) // 2})"
            )
        return student_rows
    check_tokenizers_agree(tokenizer, load_tokenizer(teacher, config.model.trust_remote_code), student, teacher)
    shared = min(student_rows, teacher_rows)
    if len(tokenizer) > shared:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens, but the output layer of the "
            f"{'student' if student_rows == shared else 'teacher'} has only {shared} rows "
            f"(student {student_rows}, teacher {teacher_rows}): its models do not fit its tokenizer"
        )
    if student_rows != teacher_rows and config.teacher.backend == "vllm":
        raise ConfigError(
            f"the teacher's output layer has {teacher_rows} rows and the student's {student_rows}: teacher.backend"
            "=vllm takes its top-k over all of the teacher's rows, which the student cannot score. Use "
            "teacher.backend=hf, which takes it over the shared rows, or a teacher padded like the student"
        )
    if config.gkd.teacher_topk > shared:
        raise ConfigError(
            f"gkd.teacher_topk={config.gkd.teacher_topk} exceeds the vocabulary the models share ({shared} tokens); "
            "lower it"
        )
    return shared


def check_served_teacher(config: GKDConfig, engine: ServedTeacherEngine | None = None) -> int:
    """A served teacher answers, serves the model asked for, tokenizes as the student does, takes the run's
    sequences and returns the run's top-k; returns the student's vocabulary, over which the top-k must fall."""
    from gkd_async.engines.served import ServedRequestError, ServedTeacherEngine

    served = engine or ServedTeacherEngine(config.teacher.openai)
    try:
        where = f"the teacher {served.model!r} served at {served.base_url}"
        student = config.model.student
        tokenizer = load_tokenizer(student, config.model.trust_remote_code)
        theirs, ours = served.tokenize(TOKENIZER_PROBE), tokenizer(TOKENIZER_PROBE)["input_ids"]
        if theirs is None:
            get_logger(role="preflight").warning("the teacher server has no /tokenize; tokenizers not compared")
        elif theirs != ours:
            raise ModelLoadError(
                f"{where} encodes text to other ids than the student {student!r} ({theirs[:8]}... vs "
                f"{ours[:8]}...): distill between models that share a tokenizer"
            )
        needed = config.data.max_prompt_length + config.rollout.max_new_tokens
        length = served.served.max_model_len
        if length is not None and needed > length:
            raise ConfigError(
                f"data.max_prompt_length + rollout.max_new_tokens = {needed} tokens, more than {where} takes "
                f"({length}, its max_model_len); lower them or serve it with a longer --max-model-len"
            )
        vocab = model_vocab_size(student, config.model.trust_remote_code)
        k = config.gkd.teacher_topk
        if k > vocab:
            raise ConfigError(f"gkd.teacher_topk={k} exceeds the student's vocabulary ({vocab} tokens); lower it")
        probe = (np.asarray(ours[:2], np.int32), np.asarray(ours[2:4], np.int32))
        try:
            served.score([probe], k, 1.0, 1, vocab_limit=vocab, sampled=True)
        except ServedRequestError as exc:
            raise ConfigError(
                f"{where} refused top-{k} prompt log-probs ({exc}); start it with --max-logprobs {max(k, 1)} or "
                "more, or lower gkd.teacher_topk"
            ) from None
        return vocab
    finally:
        if engine is None:
            served.close()


def check_context_lengths(config: GKDConfig) -> None:
    needed = config.data.max_prompt_length + config.rollout.max_new_tokens
    roles = [("student", config.model.student)]
    if uses_local_teacher(config):
        roles.append(("teacher", config.model.teacher))
    for role, spec in roles:
        length = model_context_length(spec, config.model.trust_remote_code)
        if length is not None and needed > length:
            raise ConfigError(
                f"data.max_prompt_length + rollout.max_new_tokens = {config.data.max_prompt_length} + "
                f"{config.rollout.max_new_tokens} = {needed} tokens, more than the {role} model {spec!r} takes "
                f"({length}, its max_position_embeddings); lower them"
            )


def check_scored_dataset(config: GKDConfig) -> ScoredDataset:
    """data.scored_dir is a complete scored data set whose scores the run's settings can train on."""
    dataset = ScoredDataset(config.data.scored_dir)
    manifest, gkd = dataset.manifest, config.gkd
    where = f"data.scored_dir={config.data.scored_dir} was scored"
    if dataset.k != gkd.teacher_topk:
        raise ConfigError(f"{where} at top-{dataset.k}: set gkd.teacher_topk={dataset.k}")
    if abs(dataset.temperature - gkd.distill_temperature) > 1e-6:
        raise ConfigError(
            f"{where} at temperature {dataset.temperature}: set gkd.distill_temperature={dataset.temperature}"
        )
    vocab = model_vocab_size(config.model.student, config.model.trust_remote_code)
    if manifest["student_vocab"] != vocab:
        raise ConfigError(
            f"{where} for a student vocabulary of {manifest['student_vocab']} rows, but model.student="
            f"{config.model.student} has {vocab}: score it again for this student"
        )
    longest_prompt, longest_response = manifest["longest_prompt"], manifest["longest_response"]
    if longest_prompt > config.data.max_prompt_length or longest_response > config.rollout.max_new_tokens:
        raise ConfigError(
            f"{where} with prompts up to {longest_prompt} and responses up to {longest_response} tokens: set "
            f"data.max_prompt_length>={longest_prompt} and rollout.max_new_tokens>={longest_response}"
        )
    return dataset


def check_teacher_routes(config: GKDConfig, prompts: Sequence[Prompt]) -> None:
    """With model.teachers, every prompt names one of them in its data.teacher_key field."""
    teachers, key = config.model.teachers, config.data.teacher_key
    if not teachers:
        return
    unrouted = Counter(
        repr(p.extra[key]) if key in p.extra else f"no {key!r} field"
        for p in prompts
        if p.extra.get(key) not in teachers
    )
    if unrouted:
        shown = ", ".join(f"{what} ({count} prompt{'s' * (count > 1)})" for what, count in unrouted.most_common(5))
        raise ConfigError(
            f"data.teacher_key={key!r} routes {sum(unrouted.values())} of {len(prompts)} prompts to no teacher of "
            f"model.teachers ({', '.join(sorted(teachers))}): {shown}. Add those teachers to model.teachers or fix "
            "the data"
        )


def preflight(config: GKDConfig, report: Callable[[str], None] | None = None) -> int:
    """Every check of the run that needs no stage: models, tokenizers, sizes, lengths, data, reward, and the
    served teachers if there are any. `report` gets what the user should know (prompts dropped); default:
    a line on stderr. Returns the longest prompt's tokens (0 when a scored data set stands in for the rollout)."""
    report = report or (lambda line: print(line, file=sys.stderr))
    tokenizer = load_tokenizer(config.model.student, config.model.trust_remote_code)
    check_lora(config.model)
    plan = RunPlan.of(config)
    for name in plan.teacher_roles:
        teacher_config = for_teacher(config, name)
        if uses_local_teacher(teacher_config):
            check_teacher_fits_student(teacher_config)
        if plan.teachers_score and config.teacher.backend == "openai":
            check_served_teacher(teacher_config)
        check_context_lengths(teacher_config)
    data = config.data
    prompts: list[Prompt] = []
    if config.rollout.source == "dataset":
        check_scored_dataset(config)
    else:
        prompts = load_prompts(data.train_files, tokenizer, data, report=report)
        check_teacher_routes(config, prompts)
    if config.trainer.eval_every:
        prompts += load_prompts(data.val_files, tokenizer, data, report=report)
    reward = config.custom_reward_function
    if reward.path:
        fn = load_reward_function(reward.path, reward.name)
        check_reward_takes_fields(fn, (prompt.extra for prompt in prompts))
    return max((len(prompt.ids) for prompt in prompts), default=0)
