"""The `model.*` and `data.*` sections: which models, which data and how prompts are made of it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gkd_async.config.base import _Section


class LoraSection(_Section):
    rank: int = Field(
        0,
        ge=0,
        description=(
            "LoRA rank of the student's adapters (PEFT); `0`: no adapter, every weight trains "
            "([LoRA](models.md#lora-adapters))"
        ),
    )
    alpha: float = Field(16.0, gt=0, description="the adapters' update is scaled by `alpha / rank`")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on an adapter's input while training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description=(
            "the linear layers that get an adapter: names such as `[q_proj, v_proj]`, or `all-linear` (every "
            "linear layer but the output head)"
        ),
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class ModelSection(_Section):
    student: str = Field(
        "tiny:student",
        description=(
            "student: a Hugging Face Hub id (`ORG/NAME`, or `ORG/NAME@REVISION`: a branch, tag or commit), "
            "resolved in the HF cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` honoured) or downloaded into "
            "it, by each process that loads it; a local HF model directory; or `tiny:<name>` for a tiny model "
            "built locally (`tiny:student` ties its embeddings, as real students do)"
        ),
    )
    teacher: str = Field(
        "tiny:teacher",
        description=(
            "teacher, same forms (`tiny:teacher-pairs`: one of another tokenizer); its tokenizer must agree with "
            "the student's unless `teacher.cross_tokenizer`"
        ),
    )
    teachers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "[several teachers](teachers.md#several-teachers): name -> model (same forms; `teacher.backend=openai`: "
            "the served model's name); empty: `model.teacher` scores every prompt"
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="`float32`, `bfloat16` or `float16`"
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "let a model or tokenizer whose code ships in its directory (`auto_map`) run it, in every loader "
            "(transformers, vLLM, tokenizers); off, such a model is refused in one line at start. Only for code "
            "you have read"
        ),
    )
    lora: LoraSection = Field(
        default_factory=LoraSection, description="train PEFT LoRA adapters on a frozen student (model.lora.rank>0)"
    )


class DataSection(_Section):
    train_files: list[str] = Field(
        default_factory=lambda: ["tiny:addition"],
        description=(
            "`.jsonl`, `.json` (an array of rows) or `.parquet` files, directories or globs of them, directories "
            "written by `datasets`' `save_to_disk`, Hub dataset ids (`ORG/NAME[@REVISION][:SPLIT]`, split default"
            " `train`, from the HF cache like models), or a built-in task (`tiny:addition`). A row's prompt is a "
            "string or a list of chat messages in `data.prompt_key` (verl's and TRL's rows) or a `messages` list;"
            " every other field, nested ones included, reaches the reward function ([data "
            "formats](data.md))"
        ),
    )
    val_files: list[str] = Field(
        default_factory=list, description="held-out prompts (same formats) for `trainer.eval_every`"
    )
    prompt_key: str = Field("prompt", description="the column holding each prompt: a string or a list of chat messages")
    filter_overlong_prompts: bool = Field(
        True,
        description=(
            "drop prompts longer than `data.max_prompt_length` and say how many at start (`dropped 2 of 100,000 "
            "prompts over 1,024 tokens`); `false`: refuse the data, naming the first such row"
        ),
    )
    apply_chat_template: bool = Field(
        True,
        description=(
            "template string prompts with the student's chat template; `false`: use them as they are (message "
            "lists are always templated)"
        ),
    )
    system_prompt: str | None = Field(
        None, description="a system message put before each prompt's messages (unless the row has one)"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra arguments for the chat template, e.g. `'{enable_thinking: false}'` for Qwen3",
    )
    teacher_key: str | None = Field(None, description="with `model.teachers`: the field naming each prompt's teacher")
    response_key: str = Field(
        "response",
        description=(
            "`gkd-async score`: the field holding each prompt's response (else TRL's `completion`, a string or "
            "the assistant's messages, or chat `messages` ending with the assistant's)"
        ),
    )
    scored_dir: str | None = Field(None, description="`rollout.source=dataset`: the directory `gkd-async score` wrote")
    max_prompt_length: int = Field(
        256,
        ge=1,
        description="prompts longer than this (in tokens) are dropped or refused (`data.filter_overlong_prompts`)",
    )
    tokenize_workers: int | None = Field(
        None,
        ge=0,
        description=(
            "worker processes that template and tokenize a data set of over 20,000 rows the first time (then it "
            "is cached), besides this one; unset: one per core but one, at most 8; `0`: this process alone"
        ),
    )
    shuffle: bool = Field(True, description="shuffle each epoch")
    seed: int = Field(0, description="shuffling seed")
