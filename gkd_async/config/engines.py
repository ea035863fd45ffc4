"""The `rollout.*`, `teacher.*` and `vllm.*` sections: how samples are generated and scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gkd_async.config.base import Backend, TeacherBackend, _Section


class RolloutSection(_Section):
    backend: Backend = Field("hf", description="`hf` (transformers) or `vllm`")
    source: Literal["student", "teacher", "dataset"] = Field(
        "student",
        description=(
            "who generates: `student` (on-policy GKD), `teacher` (supervised KD on teacher samples, off-policy; "
            "no staleness) or `dataset` (supervised KD on a data set scored once by `gkd-async score`, read from "
            "`data.scored_dir`)"
        ),
    )
    n: int | None = Field(
        None,
        ge=1,
        description=(
            "samples per prompt (one GRPO group); when not set: 4 with the RL loss on (GRPO compares the samples "
            "of a group), 1 without (distinct prompts teach more than samples of one: the demo measured 64 "
            "prompts x 1 sample 9 points ahead of 16 x 4)"
        ),
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_new_tokens: int = Field(64, ge=1, description="response length limit")
    student_topk: int = Field(
        0,
        ge=0,
        description=(
            "ids of the student's own top-k tokens the rollout records at every response position, for "
            "`gkd.topk_source=student` or `union`; 0: none"
        ),
    )
    batch_size: int = Field(16, ge=1, description="prompt groups a rollout worker reads and generates together")
    max_batch_tokens: int = Field(
        65536,
        ge=1,
        description=(
            "HF engine: at most rows x (prompt + new tokens) in one batched generate call; the rest wait for the next"
        ),
    )


class ServedTeacherSection(_Section):
    """teacher.backend=openai: the teacher is an OpenAI-compatible server that returns prompt log-probs
    (vLLM's `/v1/completions` with `prompt_logprobs`)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="the served teacher's OpenAI API root")
    model: str | None = Field(None, description="the served model's name; unset: the only model the server lists")
    api_key_env: str = Field(
        "GKD_TEACHER_API_KEY",
        description=(
            "environment variable holding the server's API key (unset variable: none sent); not `OPENAI_API_KEY` "
            "by default, so a key for another service is never sent to the teacher's server unasked"
        ),
    )
    allow_insecure: bool = Field(
        False,
        description=(
            "send the API key over plain `http://` to a host other than this machine; off, such a `base_url` with"
            " a key set is refused at start"
        ),
    )
    timeout_s: float = Field(120.0, gt=0, description="seconds a request may take before it is retried")
    max_retries: int = Field(
        3,
        ge=0,
        description="retries of a failed request (connection error, timeout, 429, 5xx), with exponential backoff",
    )
    max_concurrency: int = Field(4, ge=1, description="requests a scorer has in flight at once")
    unavailable_timeout_s: float = Field(
        600.0, gt=0, description="a server that has not answered this long fails the scorer; its entries stay pending"
    )


class TeacherSection(_Section):
    backend: TeacherBackend = Field(
        "hf",
        description="`hf` or `vllm` (in the scorer's process), or `openai`: a "
        "[served teacher](teachers.md#a-served-teacher)",
    )
    logprob_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of the top-k log-probs on the wire: `float32` or `float16`"
    )
    hidden_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "dtype of the teacher's hidden states on the wire with `gkd.teacher_signal=hidden`: `float32` (exact) or "
            "`bfloat16` (half the bytes, the teacher's logits within bfloat16 rounding)"
        ),
    )
    batch_size: int = Field(
        8,
        ge=1,
        description=(
            "sequences per teacher forward pass (hf) or per request (openai); vLLM schedules by "
            "`vllm.max_num_batched_tokens`"
        ),
    )
    share_prompts: bool = Field(
        False,
        description=(
            "`hf` teacher: each prompt is prefilled once for all of its samples (a group's `rollout.n`), its KV "
            "cache repeated over their responses; the same scores, and a prompt of P tokens costs P once instead "
            "of n times ([prefix-shared scoring](engines.md#prefix-shared-teacher-scoring))"
        ),
    )
    openai: ServedTeacherSection = Field(default_factory=ServedTeacherSection)
    cross_tokenizer: bool = Field(
        False,
        description=(
            "a teacher of another tokenizer: the scorer re-tokenizes each sample's text for it and maps its top-k"
            " back onto the student's tokens ([approximate](teachers.md#a-teacher-of-another-tokenizer))"
        ),
    )
    cross_tokenizer_branches: int = Field(
        4,
        ge=0,
        description=(
            "with teacher.cross_tokenizer: at each teacher row inside a student token (and the end of sequence's),"
            " the teacher scores one token further after this many of the likeliest strings that leave the"
            " response's path and do not yet decide the student's token (a second pass); 0: those go to the tail"
            " ([why](teachers.md#a-teacher-of-another-tokenizer))"
        ),
    )


class VllmSection(_Section):
    """Engine settings shared by the rollout and teacher engines when their backend is vllm."""

    kv_cache_memory_mb: int | None = Field(
        256,
        ge=1,
        description="KV cache of each vLLM engine; unset: sized from `vllm.gpu_memory_utilization` (GPU only)",
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="share of the GPU each vLLM engine may take when `vllm.kv_cache_memory_mb` is unset",
    )
    max_num_batched_tokens: int = Field(
        2048, ge=16, description="tokens per engine step; the teacher prefills longer sequences in chunks"
    )
    max_num_seqs: int = Field(256, ge=1, description="sequences an engine runs at once")
    enforce_eager: bool = Field(
        True,
        description="no CUDA graphs or torch.compile (keep it on CPU, where it was measured; `false` is faster on GPU)",
    )
