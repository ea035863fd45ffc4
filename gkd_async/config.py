"""The typed run configuration: a YAML file plus dotted command-line overrides, validated by pydantic.

Every error names the key, where its value came from (the file, an override, or the default) and what
would be accepted, so a typo never turns into a silently ignored setting.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from gkd_async.errors import ConfigError
from gkd_async.plan import RunPlan
from gkd_async.redaction import SecretUrl

LossType = Literal["forward_kl", "reverse_kl", "jsd"]
TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
Backend = Literal["hf", "vllm"]
TeacherBackend = Literal["hf", "vllm", "openai"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoraSection(_Section):
    rank: int = Field(0, ge=0, description="LoRA rank of the student's adapters; 0: no adapter, every weight trains")
    alpha: float = Field(16.0, gt=0, description="the adapter's update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="the linear layers that get an adapter: names such as [q_proj, v_proj], or all-linear (every "
        "linear layer but the output head)",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class ModelSection(_Section):
    student: str = Field(
        "tiny:student", description="a Hub id (ORG/NAME[@REVISION]), a local HF model dir, or tiny:<name>"
    )
    teacher: str = Field("tiny:teacher", description="a Hub id, a local HF model dir, or tiny:<name>")
    teachers: dict[str, str] = Field(
        default_factory=dict,
        description="several teachers: name -> model (as model.teacher; openai: the served model's name), each "
        "prompt routed by its data.teacher_key field; empty: model.teacher for every prompt",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = Field(
        False,
        description="let models and tokenizers whose code ships in their directory run it (transformers' and vLLM's "
        "trust_remote_code): only for code you have read",
    )
    lora: LoraSection = Field(
        default_factory=LoraSection, description="train PEFT LoRA adapters on a frozen student (model.lora.rank>0)"
    )


class DataSection(_Section):
    train_files: list[str] = Field(
        default_factory=lambda: ["tiny:addition"],
        description=".jsonl, .json or .parquet files, directories or globs of them, datasets save_to_disk "
        "directories, Hub dataset ids (ORG/NAME[:SPLIT]), or tiny:<task>; rows with `prompt` (a string or chat "
        "messages, as verl and TRL write them) or `messages`",
    )
    val_files: list[str] = Field(default_factory=list, description="held-out prompts, scored by the reward")
    prompt_key: str = Field("prompt", description="the column holding each prompt: a string or a list of messages")
    filter_overlong_prompts: bool = Field(
        True,
        description="drop (and count) prompts longer than data.max_prompt_length tokens; false: refuse the data, "
        "naming the first such row",
    )
    apply_chat_template: bool = Field(
        True, description="template string prompts with the student's chat template; false: use them as they are"
    )
    system_prompt: str | None = Field(None, description="a system message put before each prompt's messages")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra arguments for the chat template, e.g. {enable_thinking: false} for Qwen3; the teacher's "
        "own template gets them too (teacher.cross_tokenizer)",
    )
    teacher_key: str | None = Field(None, description="with model.teachers: the field naming each prompt's teacher")
    response_key: str = Field("response", description="`gkd-async score`: the field holding each prompt's response")
    scored_dir: str | None = Field(None, description="rollout.source=dataset: the directory `gkd-async score` wrote")
    max_prompt_length: int = Field(256, ge=1)
    tokenize_workers: int | None = Field(
        None,
        ge=0,
        description="worker processes that template and tokenize the data the first time (then it is cached) "
        "besides this one, once a data set passes 20,000 rows; unset: one per core but one, at most 8; 0: this "
        "process alone",
    )
    shuffle: bool = True
    seed: int = 0


class RolloutSection(_Section):
    backend: Backend = "hf"
    source: Literal["student", "teacher", "dataset"] = Field(
        "student",
        description="student: on-policy GKD; teacher: supervised KD on teacher samples (off-policy); dataset: "
        "supervised KD on a data set scored once by `gkd-async score` (data.scored_dir)",
    )
    n: int | None = Field(
        None,
        ge=1,
        description="samples per prompt (a GRPO group); unset: 4 with the RL loss on (GRPO compares a group), 1 "
        "without (distinct prompts teach more than samples of one)",
    )
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1, description="prompt groups a rollout worker reads and generates together")
    max_batch_tokens: int = Field(
        65536, ge=1, description="HF engine: rows x (prompt + new tokens) per generate call; more groups wait"
    )


class ServedTeacherSection(_Section):
    """teacher.backend=openai: the teacher is an OpenAI-compatible server that returns prompt log-probs
    (vLLM's `/v1/completions` with `prompt_logprobs`)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="the server's OpenAI API root")
    model: str | None = Field(None, description="the served model name; unset: the only model the server lists")
    api_key_env: str = Field(
        "GKD_TEACHER_API_KEY",
        description="environment variable holding the server's API key (unset variable: none is sent)",
    )
    allow_insecure: bool = Field(
        False, description="send the API key over plain http:// to a host other than this machine (in clear)"
    )
    timeout_s: float = Field(120.0, gt=0, description="seconds one request may take before it is retried")
    max_retries: int = Field(3, ge=0, description="retries of a failed request, with exponential backoff")
    max_concurrency: int = Field(4, ge=1, description="requests a scorer has in flight at once")
    unavailable_timeout_s: float = Field(
        600.0, gt=0, description="a server unreachable this long fails the scorer (its entries stay pending)"
    )


class TeacherSection(_Section):
    backend: TeacherBackend = Field("hf", description="hf or vllm: in the scorer's process; openai: a served teacher")
    logprob_dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = Field(8, ge=1, description="sequences per teacher forward pass (openai: per request)")
    openai: ServedTeacherSection = Field(default_factory=ServedTeacherSection)
    cross_tokenizer: bool = Field(
        False,
        description="a teacher of another tokenizer: re-tokenize the text for it, map its top-k back (approximate)",
    )


class VllmSection(_Section):
    """Engine settings shared by the rollout and teacher engines when their backend is vllm."""

    kv_cache_memory_mb: int | None = Field(
        256, ge=1, description="KV cache per engine; unset: vLLM sizes it from gpu_memory_utilization (GPU only)"
    )
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="GPU share per engine when the above is unset")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens per engine step; longer prefills are chunked")
    max_num_seqs: int = Field(256, ge=1, description="sequences an engine runs at once")
    enforce_eager: bool = Field(
        True, description="no CUDA graphs or torch.compile (keep on CPU; false is faster on GPU)"
    )


class GkdSection(_Section):
    """The seed's `gkd.*` keys, verbatim, with the seed's defaults."""

    enable_teacher: bool = True
    teacher_ip: str | None = Field(None, description="seed key, not used: the teacher is reached via Redis")
    teacher_port: int | None = Field(None, description="seed key, not used: the teacher is reached via Redis")
    teacher_topk: int = Field(
        256, ge=0, description="top-k log-probs the teacher sends per token; 0: only each sampled token's (OPD alone)"
    )
    distill_loss_coef: float = Field(1.0, ge=0)
    distill_loss_type: LossType = "forward_kl"
    distill_temperature: float = Field(1.0, gt=0)
    jsd_beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="mixture weight of the teacher in jsd; 0 and 1 as TRL reads them: jsd becomes forward_kl (0) "
        "or reverse_kl (1)",
    )
    use_rl_loss: bool = False
    rl_loss_coef: float = Field(0.0, ge=0)
    rl_clip_ratio: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the importance ratio")
    opd_coef: float = Field(
        0.0,
        ge=0,
        description="sampled-token on-policy distillation: the teacher's log-prob of each sampled token minus the "
        "student's, as a per-token advantage (PPO-clipped); 0: off",
    )

    @property
    def rl_on(self) -> bool:
        """Whether the RL loss takes part: asked for, with a weight."""
        return self.use_rl_loss and self.rl_loss_coef > 0

    @model_validator(mode="after")
    def _pure_kls(self) -> GkdSection:
        """TRL's generalized JSD at beta 0 and 1 is the forward and the reverse KL (the mixture formula itself
        would be 0 there): the loss type says so, so that every reader of it computes the same loss."""
        if self.distill_loss_type == "jsd" and self.jsd_beta in (0.0, 1.0):
            self.distill_loss_type = "forward_kl" if self.jsd_beta == 0.0 else "reverse_kl"
        return self


class CustomRewardFunctionSection(_Section):
    path: str | None = None
    name: str = "compute_score"
    timeout_s: float = Field(
        30.0, gt=0, description="a reward call running longer is killed and dead-letters its group"
    )
    num_workers: int = Field(
        1, ge=1, le=64, description="processes per rollout worker that run the reward function, each call alone"
    )


class PipelineSection(_Section):
    mode: Literal["sync", "async"] = "async"
    max_staleness: int = Field(1, ge=0, description="policy versions a trained sample may lag behind")
    redis_url: SecretUrl | None = Field(
        None, description="unset: a private local redis-server for the run; shown everywhere without its password"
    )
    run_id: str | None = None
    num_rollout_workers: int = Field(1, ge=0, description="0: start none, join them with `gkd-async worker`")
    num_teacher_scorers: int = Field(1, ge=0, description="0: start none, join them with `gkd-async worker`")
    num_learner_ranks: int = Field(1, ge=1)
    launcher: Literal["ray", "threads"] = Field(
        "ray",
        description="where `gkd-async run` starts the stages: ray (an actor each, on a private local Ray or "
        "ray.address's cluster) or threads (a thread each in the run's own process, no Ray: starts seconds "
        "sooner; one machine, one learner rank)",
    )
    read_block_ms: int = Field(
        250, ge=1, description="how long an idle stream read blocks: how soon a stage notices the run ended"
    )
    claim_timeout_s: float = Field(60.0, gt=0, description="pending entries idle this long are reclaimed")
    delivery_limit: int = Field(3, ge=1, description="deliveries before an entry goes to the dead letters")
    max_dead_groups_in_a_row: int = Field(
        50,
        ge=0,
        description="fail the run when this many admitted prompt groups in a row were dead-lettered and none "
        "trained (a reward or engine that fails on everything); 0: never",
    )
    teacher_timeout_s: float = Field(120.0, gt=0, description="fail when no teacher was seen this long")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    max_record_mb: float | None = Field(
        None, gt=0, description="larger stream entries are refused; unset: derived from the run's limits"
    )
    dead_letter_max_entries: int = Field(10_000, ge=1, description="dead letters kept (about; the oldest go)")
    dead_letter_max_payload_kb: int = Field(64, ge=0, description="payload bytes kept per dead letter, in KiB")
    weight_transport: Literal["redis", "ray", "collective", "file"] = Field(
        "redis",
        description="how new student weights reach the rollout workers: redis (in memory through the run's Redis, "
        "in buckets; no shared disk), ray (the same buckets in Ray's object store; every stage inside the run's "
        "Ray), collective (sent by learner rank 0 straight to each worker over gloo or NCCL, in buckets) or file "
        "(a safetensors file per version in logging.dir, which workers on other machines must share)",
    )
    weight_bucket_mb: float = Field(
        64.0, gt=0, le=512, description="bucket size of the in-memory weight transports (the learner's extra memory)"
    )
    weight_collective_backend: Literal["gloo", "nccl"] = Field(
        "gloo",
        description="the collective transport's backend: gloo (over TCP, CPU tensors) or nccl (GPU to GPU; the "
        "learner and every rollout worker need a GPU)",
    )
    weight_collective_timeout_s: float = Field(
        600.0, gt=0, description="collective transport: a worker that does not take a bucket within this is dropped"
    )

    @field_serializer("redis_url", when_used="json")
    def _shown_url(self, url: SecretUrl | None) -> str | None:
        """YAML and JSON dumps (config.yaml, trackers, a Ray stage's config) get the URL without its password,
        rather than pydantic's bare '**********'."""
        return None if url is None else str(url)


class TrainerSection(_Section):
    total_steps: int = Field(20, ge=1)
    train_batch_size: int = Field(4, ge=1, description="prompt groups per optimiser step")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    stream_batches: bool = Field(
        True,
        description="train each chunk of the batch as it arrives (faster; equal within float rounding); false: "
        "wait for the whole batch and train it in group order (bitwise reproducible in sync mode)",
    )
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = Field(
        "token-mean",
        description="token-mean: every response token of the global batch weighs the same; seq-mean-*: every "
        "sequence weighs the same, its tokens averaged or summed",
    )
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="warm-up as a fraction of trainer.total_steps, when trainer.warmup_steps is 0"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up; cosine decays to trainer.min_lr_ratio x lr"
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="cosine: the learning rate it ends at, as a fraction of lr"
    )
    sync_every: int = Field(1, ge=1, description="steps between weight publications to the rollout workers")
    eval_every: int = Field(0, ge=0, description="steps between greedy evaluations on data.val_files; 0: off")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="steps in a row whose loss or gradient norm is not finite (each skipped) before failing"
    )
    seed: int = 0
    # The seed's out-of-memory knobs.
    ppo_micro_batch_size_per_gpu: int = Field(4, ge=1)
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1)
    param_offload: bool = False
    optimizer_offload: bool = False
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer in the backward pass (out-of-memory knob)"
    )
    fused_lm_head: bool = Field(
        True,
        description="compute the losses from the last hidden states and the LM head a chunk of positions at a "
        "time, never holding [batch, tokens, vocab] logits (out-of-memory knob; false: full logits)",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainerSection:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set trainer.warmup_steps or trainer.warmup_ratio, not both")
        return self

    @property
    def warmup(self) -> int:
        """Warm-up steps, from trainer.warmup_steps or trainer.warmup_ratio of the total."""
        return self.warmup_steps or round(self.warmup_ratio * self.total_steps)


class LoggingSection(_Section):
    dir: str = "runs"
    level: Literal["debug", "info", "warning", "error"] = "info"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "gkd-async"
    wandb_entity: str | None = Field(None, description="W&B team or user; unset: W&B's default for the API key")
    run_name: str | None = Field(None, description="the run's name in W&B; unset: the run id")


class CheckpointSection(_Section):
    dir: str | None = Field(None, description="unset: <logging.dir>/<run_id>/checkpoints")
    save_every: int = Field(50, ge=0, description="steps between checkpoints; 0: only at the end and on a stop signal")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    resume: str | None = Field(None, description="a checkpoint dir to continue from")


class StageResources(_Section):
    """What each actor of one stage asks Ray for; the stage goes only on a node that has it."""

    num_cpus: float = Field(0, ge=0, description="CPUs per actor (0: placement by the other resources only)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; unset: an equal share of the cluster's")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per actor, e.g. {teacher_node: 1}"
    )


class RaySection(_Section):
    address: str | None = Field(
        None,
        description="an existing Ray cluster to run the stages on (HOST:6379, or ray://HOST:10001); also "
        "$RAY_ADDRESS; unset: a private local Ray",
    )
    rollout: StageResources = Field(default_factory=StageResources)
    teacher: StageResources = Field(default_factory=StageResources)
    learner: StageResources = Field(default_factory=StageResources)


class GKDConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    vllm: VllmSection = Field(default_factory=VllmSection)
    gkd: GkdSection = Field(default_factory=GkdSection)
    custom_reward_function: CustomRewardFunctionSection = Field(default_factory=CustomRewardFunctionSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="after")
    def _samples_per_prompt(self) -> GKDConfig:
        """rollout.n left unset is resolved here, once: every reader (and the run's config.yaml) sees a number."""
        if self.rollout.n is None:
            self.rollout.n = 4 if self.gkd.rl_on else 1
        return self

    @property
    def samples_per_group(self) -> int:
        """Samples in each group the stages pass on: rollout.n, or one per row of a scored data set."""
        return 1 if self.rollout.source == "dataset" else int(self.rollout.n or 1)


def valid_keys(model: type[BaseModel] = GKDConfig, prefix: str = "") -> Iterator[str]:
    """Every dotted leaf key of the schema, in declaration order."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from valid_keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GKDConfig:
    """Read a YAML config (or start from the defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        for key in _leaf_keys(raw):
            sources[key] = f"file {path}"
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value, override)
        sources[key] = f"override '{override}'"
    try:
        config = GKDConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, sources)) from None
    _check_consistency(config, sources)
    return config


def dump_config(config: GKDConfig) -> str:
    """The config as YAML, fit for files and trackers: a password in pipeline.redis_url reads *** (a
    `${NAME}` reference is kept, it holds no secret); `gkd-async resume` takes the full URL from the run's
    0600 `redis_url` file."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}' is not of the form key.sub=value (e.g. gkd.distill_loss_type=jsd)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{override}': the value is not valid YAML: {exc}") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override '{override}': {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _leaf_keys(raw: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for name, value in raw.items():
        if isinstance(value, Mapping) and value:
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _source_of(key: str, sources: Mapping[str, str]) -> str:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found:
            return found
    deeper = [source for name, source in sources.items() if name.startswith(key + ".")]
    return deeper[0] if deeper else "the default"


def _format_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> str:
    keys = list(valid_keys())
    sections = sorted({k.split(".")[0] for k in keys})
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        source = _source_of(key, sources)
        if err["type"] == "extra_forbidden":
            pool = keys if "." in key else sections
            close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"valid keys start with one of: {', '.join(sections)}"
            lines.append(f"unknown key {key} (from {source}); {hint}")
        else:
            lines.append(f"{key} = {err['input']!r} (from {source}): {err['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines) + "\nrun 'gkd-async config show' to see every key."


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
    if gkd.enable_teacher and gkd.distill_loss_coef > 0 and gkd.teacher_topk == 0:
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


def _check_launcher(config: GKDConfig, sources: Mapping[str, str]) -> None:
    pipeline = config.pipeline
    if pipeline.launcher != "threads":
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
            "pipeline.weight_transport=redis (the default), or pipeline.launcher=ray"
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


def for_teacher(config: GKDConfig, name: str | None) -> GKDConfig:
    """The run's config as one teacher's scorers see it: model.teacher (and the served model's name) set to
    that teacher's model. `name` None: the run's only teacher."""
    if name is None:
        return config
    if name not in config.model.teachers:
        raise ConfigError(f"no teacher named {name!r}: model.teachers has {sorted(config.model.teachers)}")
    spec = config.model.teachers[name]
    copy = config.model_copy(deep=True)
    copy.model.teacher = spec
    if copy.teacher.backend == "openai":
        copy.teacher.openai.model = spec
    return copy


def _precedence(source: str) -> int:
    return 2 if source.startswith("override") else 1 if source.startswith("file") else 0
