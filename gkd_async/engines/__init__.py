"""Inference engines for the rollout workers and teacher scorers, behind the interfaces of base.py:
HF transformers (hf.py) and vLLM (vllm.py) in the worker's process, and a teacher served over HTTP by an
OpenAI-compatible server (served.py).

Both backends give the same records: the same alignment, the same log-prob conventions, tested against
each other. A backend is built from the config by its factory in the registries below; vLLM is imported
only when a backend asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gkd_async.config.schema import GKDConfig
from gkd_async.engines.base import RolloutEngine, Sample, TeacherEngine

__all__ = ["ROLLOUT_ENGINES", "TEACHER_ENGINES", "RolloutEngine", "Sample", "TeacherEngine"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def max_sequence_length(cfg: GKDConfig) -> int:
    return cfg.data.max_prompt_length + cfg.rollout.max_new_tokens


def _hf_rollout(cfg: GKDConfig, model_spec: str, pad_id: int, eos_id: int) -> RolloutEngine:
    from gkd_async.engines.hf import HFRolloutEngine

    return HFRolloutEngine(
        model_spec,
        cfg.model.dtype,
        pad_id,
        eos_id,
        default_device(),
        max_batch_tokens=cfg.rollout.max_batch_tokens,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def _vllm_rollout(cfg: GKDConfig, model_spec: str, pad_id: int, eos_id: int) -> RolloutEngine:
    from gkd_async.engines.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(
        model_spec,
        cfg.model.dtype,
        eos_id,
        cfg.vllm,
        max_sequence_length(cfg),
        seed=cfg.trainer.seed,
        trust_remote_code=cfg.model.trust_remote_code,
        max_topk=cfg.rollout.student_topk,
    )


def _hf_teacher(cfg: GKDConfig, pad_id: int) -> TeacherEngine:
    from gkd_async.engines.hf import HFTeacherEngine

    return HFTeacherEngine(
        cfg.model.teacher,
        cfg.model.dtype,
        pad_id,
        default_device(),
        trust_remote_code=cfg.model.trust_remote_code,
        share_prompts=cfg.teacher.share_prompts,
    )


def _vllm_teacher(cfg: GKDConfig, pad_id: int) -> TeacherEngine:
    from gkd_async.engines.vllm import VLLMTeacherEngine

    return VLLMTeacherEngine(
        cfg.model.teacher,
        cfg.model.dtype,
        cfg.vllm,
        max_sequence_length(cfg),
        max_topk=cfg.gkd.teacher_topk,
        trust_remote_code=cfg.model.trust_remote_code,
        prefix_caching=cfg.teacher.cross_tokenizer and cfg.teacher.cross_tokenizer_branches > 0,
    )


def _served_teacher(cfg: GKDConfig, pad_id: int) -> TeacherEngine:
    from gkd_async.engines.served import ServedTeacherEngine

    return ServedTeacherEngine(cfg.teacher.openai)


ROLLOUT_ENGINES: dict[str, Callable[[GKDConfig, str, int, int], RolloutEngine]] = {
    "hf": _hf_rollout,
    "vllm": _vllm_rollout,
}
TEACHER_ENGINES: dict[str, Callable[[GKDConfig, int], TeacherEngine]] = {
    "hf": _hf_teacher,
    "vllm": _vllm_teacher,
    "openai": _served_teacher,
}


def make_rollout_engine(cfg: GKDConfig, model_spec: str, pad_id: int, eos_id: int) -> RolloutEngine:
    return ROLLOUT_ENGINES[cfg.rollout.backend](cfg, model_spec, pad_id, eos_id)


def make_teacher_engine(cfg: GKDConfig, pad_id: int) -> TeacherEngine:
    return TEACHER_ENGINES[cfg.teacher.backend](cfg, pad_id)
