"""Inference engines for the rollout workers and teacher scorers: HF transformers (hf.py) and vLLM (vllm.py).

Both backends give the same records: the same alignment, the same log-prob conventions, tested against
each other. vLLM is imported only when a backend asks for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gkd_async.config import GKDConfig
from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine

if TYPE_CHECKING:
    from gkd_async.engines.vllm import VLLMRolloutEngine, VLLMTeacherEngine

    RolloutEngine = HFRolloutEngine | VLLMRolloutEngine
    TeacherEngine = HFTeacherEngine | VLLMTeacherEngine


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def max_sequence_length(cfg: GKDConfig) -> int:
    return cfg.data.max_prompt_length + cfg.rollout.max_new_tokens


def make_rollout_engine(cfg: GKDConfig, model_spec: str, pad_id: int, eos_id: int) -> RolloutEngine:
    if cfg.rollout.backend == "vllm":
        from gkd_async.engines.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(
            model_spec, cfg.model.dtype, eos_id, cfg.vllm, max_sequence_length(cfg), seed=cfg.trainer.seed
        )
    return HFRolloutEngine(model_spec, cfg.model.dtype, pad_id, eos_id, default_device())


def make_teacher_engine(cfg: GKDConfig, pad_id: int) -> TeacherEngine:
    if cfg.teacher.backend == "vllm":
        from gkd_async.engines.vllm import VLLMTeacherEngine

        return VLLMTeacherEngine(
            cfg.model.teacher, cfg.model.dtype, cfg.vllm, max_sequence_length(cfg), max_topk=cfg.gkd.teacher_topk
        )
    return HFTeacherEngine(cfg.model.teacher, cfg.model.dtype, pad_id, default_device())
