"""The memory ledger: what each process of a run will hold, predicted from the config and the models' shapes
before anything is loaded, so that a run that cannot fit is refused in seconds, with what to change, instead of
being killed by the kernel minutes in. `gkd-async run` prints it at start and, at the end, sets it beside the
peak resident memory each process reported (`compare_with_measured`).

The ledger counts host memory of a CPU run. A process's predicted peak is what it holds throughout plus its
largest phase (the backward pass, the optimiser step, loading a version...); the run's is every process at its
peak at once. A run whose held memory alone passes what the machine has available is refused; one whose peaks
together pass it is warned about. Per process, in bytes:

- learner rank: float32 weights, 4 B a parameter, sharded over the ranks; gradients and AdamW's two moments, 12 B
  a trained parameter (LoRA: the adapters only); the activations a micro-batch keeps for the backward pass,
  (8H + 3 kv + 4I) numbers a token and decoder layer (the norms' inputs and outputs, q, k, v and the attention
  output, the MLP's gate, up, activation and product), or H with activation checkpointing; attention weights where
  attention is computed eagerly (heads x tokens^2 a layer); the LM head's logits chunks (`loss.fused_head`);
  AdamW's foreach temporaries in the step (4 B a trained parameter).
- rollout worker: the student at `model.dtype` (with `pipeline.weight_transport=in_process`, loaded at start, then
  the learner's published copy, shared), the next version while it loads (and, read from pieces, the embedding
  joined), the KV cache (2 L kv numbers a token) of a generate batch.
- teacher scorer: the teacher at `model.dtype` and a forward pass's working set.
- Redis: the versions the redis transport keeps (two, and one being written); Ray's object store: the same for
  the ray transport.
Each process also holds Python, torch and transformers (`PROCESS_BASE_BYTES`). With `pipeline.launcher=threads`
every stage is one process: the ledger says so and adds them up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gkd_async.config.plan import RunPlan
from gkd_async.config.schema import GKDConfig
from gkd_async.errors import ConfigError

PROCESS_BASE_BYTES = 500 * 10**6  # python with torch, transformers and a stage's modules imported (0.36 GB measured)
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_CHUNK_COPIES = 15  # a fused-head chunk's working set, in chunks of logits (see loss.fused_head.head_chunk_rows)
VLLM_OVERHEAD_BYTES = 1_500 * 10**6  # a vLLM engine's own buffers and compiled graphs besides weights and KV cache
REDIS_VERSIONS = 3  # the redis transport keeps the two newest versions and writes the next
GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What the ledger needs of a model, read from its config (built on the meta device: no weights)."""

    params: int  # parameters, a tied embedding counted once
    trainable: int  # of them, those that train (with model.lora, the adapters only)
    hidden: int
    layers: int
    heads: int
    kv_width: int  # key/value heads x head size
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, spec: str, trust_remote_code: bool = False, lora=None) -> ModelShape:
        from gkd_async.models.loading import meta_model
        from gkd_async.models.lora import add_lora

        model = meta_model(spec, trust_remote_code)
        text = model.config.get_text_config()
        params = sum(p.numel() for p in model.parameters())  # parameters() yields a shared parameter once
        trainable = params
        if lora is not None and lora.enabled:
            model = add_lora(model, lora)
            params = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(
            params=params,
            trainable=trainable,
            hidden=int(text.hidden_size),
            layers=int(text.num_hidden_layers),
            heads=heads,
            kv_width=int(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
            vocab=int(text.vocab_size),
        )

    @property
    def kept_per_token_layer(self) -> int:
        """Numbers one decoder layer keeps per token for its backward pass."""
        return 8 * self.hidden + 3 * self.kv_width + 4 * self.intermediate

    @property
    def kv_cache_per_token(self) -> int:
        return 2 * self.layers * self.kv_width


@dataclass(frozen=True)
class Holding:
    what: str
    bytes: int
    phase: str | None = None  # None: held from start to end; else only while the process is in this phase


@dataclass(frozen=True)
class ProcessLedger:
    """One kind of process: what each one holds, and how many of them run. Its peak is what it holds throughout
    plus its largest phase (a learner's backward pass and its optimiser step do not hold their buffers at once)."""

    name: str
    roles: tuple[str, ...]  # the heartbeat roles of its stages, to match measured processes to it
    count: int
    holdings: tuple[Holding, ...]

    @property
    def held_bytes(self) -> int:
        return sum(h.bytes for h in self.holdings if h.phase is None)

    @property
    def phases(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.holdings:
            if h.phase is not None:
                out[h.phase] = out.get(h.phase, 0) + h.bytes
        return out

    @property
    def each_bytes(self) -> int:
        """The predicted peak of one such process."""
        return self.held_bytes + max(self.phases.values(), default=0)


@dataclass(frozen=True)
class MemoryLedger:
    processes: tuple[ProcessLedger, ...]

    @property
    def total_bytes(self) -> int:
        """Every process at its peak at once: the most the run can take."""
        return sum(p.count * p.each_bytes for p in self.processes)

    @property
    def held_bytes(self) -> int:
        """What the processes hold for the whole run: below this, the run cannot even start its steps."""
        return sum(p.count * p.held_bytes for p in self.processes)

    def lines(self) -> list[str]:
        out = [
            f"memory ledger: {self.total_bytes / GB:.1f} GB at every process's peak, {self.held_bytes / GB:.1f} GB "
            "held throughout"
        ]
        for process in self.processes:
            times = f" x {process.count}" if process.count > 1 else ""
            out.append(f"  {process.name}{times}: peak {process.each_bytes / GB:.2f} GB each")
            for h in process.holdings:
                if h.bytes > 0:
                    out.append(f"    {h.bytes / GB:6.2f} GB  {h.what}" + (f"  [while {h.phase}]" if h.phase else ""))
        return out

    def as_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "held_bytes": self.held_bytes,
            "processes": [
                {
                    "name": p.name,
                    "roles": list(p.roles),
                    "count": p.count,
                    "each_bytes": p.each_bytes,
                    "held_bytes": p.held_bytes,
                    "holdings": [{"what": h.what, "bytes": h.bytes, "phase": h.phase} for h in p.holdings],
                }
                for p in self.processes
            ],
        }


@dataclass(frozen=True)
class RunShape:
    """The lengths that size activations and caches: the longest prompt the data holds (0: unknown, then
    data.max_prompt_length is assumed)."""

    prompt_tokens: int = 0


def predict_memory(config: GKDConfig, shape: RunShape | None = None) -> MemoryLedger:
    """The ledger of `config`'s run on this machine (see the module's text for what each line counts)."""
    shape = shape or RunShape()
    plan = RunPlan.of(config)
    m = config.model
    student = ModelShape.of(m.student, m.trust_remote_code, m.lora)
    seq = (shape.prompt_tokens or config.data.max_prompt_length) + config.rollout.max_new_tokens
    stages: list[ProcessLedger] = [_learner(config, plan, student, seq)]
    if plan.rollouts_run:
        model = student if plan.on_policy else ModelShape.of(m.teacher, m.trust_remote_code)
        stages.append(_rollout(config, model, seq))
    if plan.teachers_score and config.teacher.backend != "openai":
        for name in plan.teacher_roles:
            spec = m.teachers[name] if name is not None else m.teacher
            stages.append(_teacher(config, ModelShape.of(spec, m.trust_remote_code), seq, name))
    stores = _stores(config, student)
    if config.pipeline.launcher != "threads":
        return MemoryLedger((*stages, *stores))
    # One process: what each stage holds throughout, and each stage's largest phase (the stages overlap).
    holdings = [Holding("python, torch and transformers (one process)", PROCESS_BASE_BYTES)]
    for stage in stages:
        label = stage.name + (f" x {stage.count}" if stage.count > 1 else "")
        holdings += [Holding(f"{label}: {h.what}", h.bytes * stage.count) for h in stage.holdings[1:] if not h.phase]
        if stage.phases:
            phase, size = max(stage.phases.items(), key=lambda item: item[1])
            holdings.append(Holding(f"{label}: its largest phase", size * stage.count, f"{stage.name}: {phase}"))
    peaks = [h for h in holdings if h.phase]
    held = tuple(h for h in holdings if not h.phase)
    together = Holding("the stages' largest phases at once (" + ", ".join(h.phase for h in peaks) + ")",
                       sum(h.bytes for h in peaks), "every stage busy")  # fmt: skip
    roles = tuple(role for stage in stages for role in stage.roles)
    one = ProcessLedger("the run's process (pipeline.launcher=threads: every stage in it)", roles, 1, (*held, together))
    return MemoryLedger((one, *stores))


def _base() -> Holding:
    return Holding("python, torch and transformers", PROCESS_BASE_BYTES)


def _learner(config: GKDConfig, plan: RunPlan, student: ModelShape, seq: int) -> ProcessLedger:
    t, ranks = config.trainer, config.pipeline.num_learner_ranks
    if t.pack_sequences:  # one row of up to ppo_max_token_len_per_gpu tokens, attention within each sample
        tokens = max(t.ppo_max_token_len_per_gpu, seq)
        scores = tokens * seq * student.heads
    else:  # padded rows of the longest sample's width, as many as both budgets allow (at least one)
        samples = t.train_batch_size * (config.rollout.n or 1)
        rows = max(1, min(t.ppo_micro_batch_size_per_gpu, samples, t.ppo_max_token_len_per_gpu // seq))
        tokens = rows * seq
        scores = rows * student.heads * seq * seq
    compute = DTYPE_BYTES[config.model.dtype]
    kept_layers = 1 if t.activation_checkpointing else student.layers  # checkpointing: one layer recomputed
    kept = tokens * kept_layers * student.kept_per_token_layer * compute
    if t.activation_checkpointing:
        kept += tokens * student.layers * student.hidden * compute  # each layer's input
    backward = "the backward pass"
    if t.fused_lm_head:
        from gkd_async.loss.fused_head import head_chunk_rows

        chunk = HEAD_CHUNK_COPIES * head_chunk_rows((student.vocab, student.hidden)) * student.vocab * FLOAT32
        logits = Holding("the LM head's logits, a chunk of positions at a time", chunk, backward)
    else:
        logits = Holding(
            "[tokens, vocab] logits, their log-softmax and gradient", 3 * tokens * student.vocab * FLOAT32, backward
        )
    shard = f" / {ranks} ranks" if ranks > 1 else ""
    holdings = [
        _base(),
        Holding(f"student weights, float32, {student.params / 1e6:,.0f}M parameters{shard}",
                math.ceil(student.params * FLOAT32 / ranks)),
        Holding(f"gradients and AdamW's two moments, float32, {student.trainable / 1e6:,.0f}M trained{shard}",
                math.ceil(student.trainable * 3 * FLOAT32 / ranks)),
        Holding(f"activations of a micro-batch ({tokens:,} tokens x {student.layers} layers)", kept, backward),
        Holding("attention weights of a micro-batch (eager attention)", scores * FLOAT32 * kept_layers, backward),
        logits,
        Holding("AdamW's temporaries (its foreach step makes one tensor per parameter)",
                math.ceil(student.trainable * FLOAT32 / ranks), "the optimiser step"),
    ]  # fmt: skip
    if ranks > 1 or config.model.dtype != "float32":
        layer = (student.params - student.vocab * student.hidden) // max(student.layers, 1)
        gathered = (student.vocab * student.hidden + 2 * layer) * (compute if ranks == 1 else FLOAT32)
        holdings.append(Holding(f"the embedding and two layers gathered at {config.model.dtype}", gathered, backward))
    transport, version = config.pipeline.weight_transport, student.params * FLOAT32
    if transport == "in_process":
        holdings.append(Holding("the published version (one copy, shared by the rollout workers)", version))
    elif transport in ("redis", "ray", "collective"):
        bucket = int(config.pipeline.weight_bucket_mb * 2**20)
        holdings.append(Holding("a weights bucket being sent", bucket, "a publish"))
    if transport == "file" or plan.eval_every:
        holdings.append(Holding("the whole state dict, gathered", version, "a publish"))
    return ProcessLedger("learner rank", ("learner",), ranks, tuple(holdings))


def _rollout(config: GKDConfig, model: ModelShape, seq: int) -> ProcessLedger:
    r, p = config.rollout, config.pipeline
    width = DTYPE_BYTES[config.model.dtype]
    weights = model.params * width
    rows = max(1, min(r.batch_size * (r.n or 1), r.max_batch_tokens // seq))
    generate = "a generate call"
    if r.backend == "vllm":
        kv = Holding("vLLM's KV cache (vllm.kv_cache_memory_mb)", (config.vllm.kv_cache_memory_mb or 0) * 2**20)
        engine = Holding("vLLM's own buffers", VLLM_OVERHEAD_BYTES)
    else:
        kv = Holding(f"KV cache of a generate batch ({rows} rows x {seq} tokens)",
                     rows * seq * model.kv_cache_per_token * width, generate)  # fmt: skip
        engine = Holding(f"a generate step's logits ({rows} rows)", 2 * rows * model.vocab * FLOAT32, generate)
    shared = p.weight_transport == "in_process" and width == FLOAT32
    note = " (loaded at start; then the learner's published copy, shared)" if shared else ""
    student = Holding(f"the student at {config.model.dtype}{note}", weights)
    holdings = [_base(), student, kv, engine]
    if p.weight_transport != "in_process":
        loading = "loading a version"
        holdings.append(Holding("the next version, read while this one serves", model.params * FLOAT32, loading))
        if p.weight_transport in ("redis", "ray"):
            largest = model.vocab * model.hidden * FLOAT32  # the embedding, cut into pieces on the wire
            holdings.append(Holding("the largest tensor joined from its pieces", largest, loading))
    return ProcessLedger("rollout worker", ("rollout",), p.num_rollout_workers, tuple(holdings))


def _teacher(config: GKDConfig, model: ModelShape, seq: int, name: str | None) -> ProcessLedger:
    from gkd_async.loss.fused_head import CHUNK_ELEMENTS

    width = DTYPE_BYTES[config.model.dtype]
    batch = config.teacher.batch_size
    working = batch * seq * (4 * model.hidden + 3 * model.intermediate) * width + 4 * CHUNK_ELEMENTS * FLOAT32
    holdings = (
        _base(),
        Holding(f"the teacher at {config.model.dtype}, {model.params / 1e6:,.0f}M parameters", model.params * width),
        Holding(f"a forward pass of {batch} sequences x {seq} tokens, top-k by chunks", working, "scoring"),
    )
    label = "teacher scorer" + (f" ({name})" if name else "")
    role = "teacher" if name is None else f"teacher:{name}"
    return ProcessLedger(label, (role,), config.pipeline.num_teacher_scorers, holdings)


def _stores(config: GKDConfig, student: ModelShape) -> list[ProcessLedger]:
    p = config.pipeline
    version = student.params * FLOAT32
    out = []
    if p.redis_url is None:
        holdings = [Holding("the server", 20 * 10**6)]
        if p.weight_transport == "redis":
            holdings += [
                Holding("the two newest student versions", 2 * version),
                Holding("the next version, written before the oldest goes", version, "a publish"),
                Holding("its allocator's rounding and client buffers (measured: 9% of the versions)",
                        int(0.09 * 3 * version), "a publish"),
            ]  # fmt: skip
        out.append(ProcessLedger("redis-server (private)", ("redis",), 1, tuple(holdings)))
    if p.weight_transport == "ray" and p.launcher == "ray":
        versions = (Holding("the two newest student versions", 2 * version),
                    Holding("the next version, put before the oldest goes", version, "a publish"))  # fmt: skip
        out.append(ProcessLedger("Ray's object store", ("ray",), 1, versions))
    return out


def available_memory_bytes() -> int | None:
    """What this machine can still give: MemAvailable, within this cgroup's limit; None where neither is known."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits(ledger: MemoryLedger, config: GKDConfig, available: int | None) -> str | None:
    """Refuse (ConfigError, one line) a run whose held memory alone exceeds `available`: it cannot fit. A run
    whose peaks together exceed it may still fit (the peaks need not meet): the warning line for it, else None."""
    if available is None or ledger.total_bytes <= available:
        return None
    fixes = []
    m, t, p = config.model, config.trainer, config.pipeline
    if m.dtype == "float32":
        fixes.append("model.dtype=bfloat16 (rollout and teacher weights at half the size)")
    if not m.lora.enabled:
        fixes.append("model.lora.rank=16 (gradients and optimiser state for the adapters only)")
    if not t.activation_checkpointing:
        fixes.append("trainer.activation_checkpointing=true")
    if t.ppo_micro_batch_size_per_gpu > 1:
        fixes.append(f"a smaller trainer.ppo_micro_batch_size_per_gpu (now {t.ppo_micro_batch_size_per_gpu})")
    if p.weight_transport == "redis":
        fixes.append("pipeline.weight_transport=file (no student versions held in Redis)")
    if p.num_rollout_workers > 1 or p.num_teacher_scorers > 1:
        fixes.append("fewer pipeline.num_rollout_workers or pipeline.num_teacher_scorers")
    fixes.append("a stage on another machine (`gkd-async worker`)")
    each = ", ".join(f"{proc.name.split(' (')[0]} {proc.held_bytes / GB:.1f}" for proc in ledger.processes)
    if ledger.held_bytes > available:
        raise ConfigError(
            f"this run cannot fit: its processes hold {ledger.held_bytes / GB:.1f} GB ({each} GB) for the whole run "
            f"and this machine has {available / GB:.1f} GB available; change one of: {'; '.join(fixes)} "
            "(pipeline.check_memory=false tries anyway)"
        )
    return (
        f"warning: at their peaks together this run's processes would take {ledger.total_bytes / GB:.1f} GB of the "
        f"{available / GB:.1f} GB available; it fits only while their peaks do not meet. To be sure: "
        + "; ".join(fixes[:3])
    )


def compare_with_measured(predicted: list[dict], measured: dict[str, dict]) -> list[dict]:
    """Each predicted process (`MemoryLedger.as_dict()["processes"]`) beside the largest peak that a process of
    its roles reported: `measured` maps a process (host:pid) to {"roles": [...], "peak_rss": bytes}
    (`transport.streams.ProcessMemory.by_process`)."""
    rows = []
    for process in predicted:
        peaks = [int(m["peak_rss"]) for m in measured.values() if set(m["roles"]) & set(process["roles"])]
        rows.append(
            {
                "process": process["name"],
                "predicted_bytes": process["each_bytes"],
                "measured_bytes": max(peaks) if peaks else None,
                "processes_seen": len(peaks),
            }
        )
    return rows
