"""The `pipeline.*` and `ray.*` sections: how the stages are placed, connected and kept alive."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_serializer, model_validator

from gkd_async.config.base import _Section
from gkd_async.redaction import SecretUrl


class PipelineSection(_Section):
    mode: Literal["sync", "async"] = Field(
        "async", description="`sync` (lockstep, the seed's behaviour; forces `max_staleness` 0) or `async`"
    )
    max_staleness: int = Field(1, ge=0, description="policy versions a trained sample may lag behind the learner")
    stale_policy: Literal["drop", "reweight"] = Field(
        "drop",
        description=(
            "what happens to on-policy samples older than `pipeline.max_staleness` when they arrive: `drop` (their "
            "prompt is generated again, which favours the prompts whose rollouts come back sooner) or `reweight` "
            "(trained, each token's terms weighted by the truncated importance ratio of the current student to the "
            "behaviour policy; see [stale samples](training.md#stale-samples-reweighted-not-dropped))"
        ),
    )
    stale_weight_clip: float = Field(
        2.0,
        gt=0,
        description=(
            "with `pipeline.stale_policy=reweight`: the largest importance weight a stale token gets (truncated "
            "importance sampling)"
        ),
    )
    redis_url: SecretUrl | None = Field(
        None,
        description=(
            "unset: `$GKD_REDIS_URL` if set, else a private local `redis-server` for the run; `${NAME}` in it is "
            "read from the environment (e.g. `redis://:${GKD_REDIS_PASSWORD}@host:6379/0`), so configs and the "
            "run's `config.yaml` need not hold the password"
        ),
    )
    run_id: str | None = Field(None, description="stream namespace `gkd:<run_id>:*`; unset: generated")
    num_rollout_workers: int = Field(
        1, ge=0, description="rollout workers launched by `run`; 0: none, join your own with `gkd-async worker rollout`"
    )
    num_teacher_scorers: int = Field(
        1, ge=0, description="teacher scorers launched by `run`; 0: none, join your own with `gkd-async worker teacher`"
    )
    num_learner_ranks: int = Field(1, ge=1, description="FSDP2 ranks of the learner")
    launcher: Literal["ray", "threads"] = Field(
        "ray",
        description=(
            "where `gkd-async run` starts the stages: `ray` (an actor each, on a private local Ray or "
            "`ray.address`'s cluster) or `threads` (a thread each in the command's own process, no Ray: a short "
            "run ends seconds sooner; one machine, one learner rank, HF engines; see [one "
            "process](scaling-out.md#one-process-pipelinelauncherthreads))"
        ),
    )
    read_block_ms: int = Field(
        250,
        ge=1,
        description=(
            "how long an idle stream read blocks (data ends the wait at once): how soon a stage notices that the "
            "run ended or was stopped (1000 cost a run's end 0.7 s more)"
        ),
    )
    claim_timeout_s: float = Field(
        60.0, gt=0, description="a pending entry idle this long is reclaimed by another consumer"
    )
    delivery_limit: int = Field(3, ge=1, description="deliveries before an entry goes to the dead-letter stream")
    max_dead_groups_in_a_row: int = Field(
        50,
        ge=0,
        description=(
            "fail the run when this many admitted prompt groups in a row were dead-lettered with none trained "
            "(something fails on every sample); 0: never"
        ),
    )
    teacher_timeout_s: float = Field(120.0, gt=0, description="fail the run when no teacher has been seen this long")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="worker heartbeat period")
    max_record_mb: float | None = Field(
        None,
        gt=0,
        description=(
            "larger stream entries are refused (dead-lettered) before they are decoded; unset: twice the largest "
            "scored record the run can make (`rollout.n` samples at `data.max_prompt_length` + "
            "`rollout.max_new_tokens` tokens, each with its top-`gkd.teacher_topk` ids and log-probs) plus 16 MiB"
            " for a row's fields"
        ),
    )
    dead_letter_max_entries: int = Field(10_000, ge=1, description="dead letters kept (about: the oldest go first)")
    dead_letter_max_payload_kb: int = Field(
        64, ge=0, description="payload bytes kept per dead letter, in KiB (the reason is always kept)"
    )
    weight_transport: Literal["redis", "in_process", "ray", "collective", "file"] | None = Field(
        None,
        description=(
            "how each new student version reaches the rollout workers; unset: `in_process` with "
            "`pipeline.launcher=threads`, else `redis`. `in_process` (the learner's gathered tensors handed to the "
            "rollout threads of the same process as one copy in memory, no Redis value; "
            "`pipeline.launcher=threads` only), "
            "`redis` (in memory through the run's "
            "Redis, streamed a tensor at a time from the learner into buckets; no shared disk; Redis holds the "
            "two newest versions), `ray` (the same buckets in Ray's object store, pulled by each worker from the "
            "learner's node; every stage must run inside the run's Ray, so not for `gkd-async worker`), "
            "`collective` (the same buckets sent by learner rank 0 straight to each worker over a gloo or NCCL "
            'group of two; workers may join later, with `gkd-async worker` too; see "Scaling out") or `file` (a '
            "safetensors file per version under `logging.dir`, which workers on other machines must share)"
        ),
    )
    check_memory: bool = Field(
        True,
        description=(
            "refuse at start a run whose [memory ledger](scaling-out.md#the-memory-ledger) (what each process will "
            "hold, printed at start) exceeds the memory this machine has available, naming what to change; "
            "`false`: print it and try anyway. Never for a run that joins a Ray cluster (`ray.address`)"
        ),
    )
    weight_bucket_mb: float = Field(
        64.0,
        gt=0,
        le=512,
        description=(
            "bucket size of the `redis`, `ray` and `collective` transports: the learner's extra memory while "
            "publishing; `redis` and `ray` cut a larger tensor into pieces of rows, and a `redis` bucket must fit "
            "one Redis value (the server's proto-max-bulk-len, 512 MB by default, less its header)"
        ),
    )
    weight_collective_backend: Literal["gloo", "nccl"] = Field(
        "gloo",
        description=(
            "the `collective` transport's backend: `gloo` (TCP, CPU tensors) or `nccl` (GPU to GPU; the learner's"
            " rank 0 and every rollout worker need a GPU)"
        ),
    )
    weight_collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description=(
            "`collective`: a worker that takes no bucket within this is dropped by the learner; a worker that "
            "receives nothing for this long reconnects (and is sent the newest version again)"
        ),
    )

    @model_validator(mode="after")
    def _default_weight_transport(self) -> PipelineSection:
        """pipeline.weight_transport left unset is resolved here, once: every reader sees a transport."""
        if self.weight_transport is None:
            self.weight_transport = "in_process" if self.launcher == "threads" else "redis"
        return self

    @field_serializer("redis_url", when_used="json")
    def _shown_url(self, url: SecretUrl | None) -> str | None:
        """YAML and JSON dumps (config.yaml, trackers, a Ray stage's config) get the URL without its password,
        rather than pydantic's bare '**********'."""
        return None if url is None else str(url)


class StageResources(_Section):
    """What each actor of one stage asks Ray for; the stage goes only on a node that has it."""

    num_cpus: float = Field(0, ge=0, description="CPUs each rollout worker asks Ray for")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs each rollout worker asks for; unset: an equal share of the cluster's GPUs"
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "custom Ray resources each rollout worker asks for, e.g. `{rollout_node: 1}` to pin it to the nodes "
            "that offer one"
        ),
    )


class RaySection(_Section):
    address: str | None = Field(
        None,
        description=(
            "an existing Ray cluster to run the stages on (`HOST:6379` or `ray://HOST:10001`; `$RAY_ADDRESS` "
            "too); unset: a private local Ray"
        ),
    )
    rollout: StageResources = Field(default_factory=StageResources)
    teacher: StageResources = Field(default_factory=StageResources)
    learner: StageResources = Field(default_factory=StageResources)
