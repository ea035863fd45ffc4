"""RolloutWorker: prompts in, n sampled responses per prompt out, from the newest student weights."""

from __future__ import annotations

import time

import numpy as np

from gkd_async.engines import make_rollout_engine
from gkd_async.errors import RecordError
from gkd_async.models.loading import load_tokenizer, meta_model, model_vocab_size
from gkd_async.rewards.loading import RewardError
from gkd_async.rewards.pool import RewardPool
from gkd_async.transport.limits import RecordLimits, check_prompt_record_within
from gkd_async.transport.records import PromptRecord, RolloutRecord, decode_prompt_record, encode_rollout_record
from gkd_async.transport.redis_client import RedisUnavailableError
from gkd_async.transport.streams import StreamEntry
from gkd_async.weight_sync.collective import CollectiveWeights
from workers.common import RunContext, RunFailedError, StageWorker, group_seed

ROLE = "rollout"
GROUP = "rollout"


class RolloutWorker(StageWorker):
    role = ROLE

    def __init__(self, ctx: RunContext, name: str | None = None) -> None:
        super().__init__(ctx, name)
        cfg = ctx.config
        tokenizer = self.tokenizer = load_tokenizer(cfg.model.student, cfg.model.trust_remote_code)
        reward = cfg.custom_reward_function
        self.reward = None
        if reward.path:
            self.reward = RewardPool(
                reward.path,
                reward.name,
                reward.num_workers,
                reward.timeout_s,
                lambda: self.liveness.beat(version=self.engine.version),
            )
        # Supervised KD samples from the teacher, whose weights never change (its samples carry version 0).
        self.off_policy = cfg.rollout.source == "teacher"
        spec = cfg.model.teacher if self.off_policy else cfg.model.student
        self.limits = RecordLimits.for_run(cfg, model_vocab_size(spec, cfg.model.trust_remote_code))
        self.engine = make_rollout_engine(cfg, spec, tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.weights = ctx.weights()
        if isinstance(self.weights, CollectiveWeights) and not self.off_policy:  # tensors checked before allocating
            student = meta_model(spec, cfg.model.trust_remote_code).state_dict()
            self.weights.expect({name: tuple(tensor.shape) for name, tensor in student.items()})
        self._unreported_load_s = 0.0  # seconds spent loading weights since the last record was made
        self.unloadable: dict[int, str] = {}  # weight versions that failed to load, and why: not tried again
        self.consumer = ctx.consumer(ctx.names.prompts, GROUP, self.name)

    def step(self) -> None:
        cfg = self.ctx.config
        self.liveness.beat(version=self.engine.version, produced=self.done)
        if not self.off_policy:
            self._refresh_weights(0)
        pending: list[tuple[StreamEntry, PromptRecord]] = []
        pending += self.read_records(cfg.rollout.batch_size, self._decode)
        while pending:
            if not self.off_policy and not self._refresh_weights(pending[0][1].min_version):
                return  # the run stopped while waiting
            # Entries come in step order; never hold an early group back for a later one's weights.
            ready = [p for p in pending if self.off_policy or p[1].min_version <= self.engine.version]
            ready = ready[
                : self.engine.groups_per_call(
                    [len(p.prompt_ids) for _, p in ready], cfg.rollout.n, cfg.rollout.max_new_tokens
                )
            ]
            self.each_alone_on_failure(ready, self._generate, lambda item: item[0])
            taken = {entry.id for entry, _ in ready}
            pending = [p for p in pending if p[0].id not in taken]

    def _generate(self, batch: list[tuple[StreamEntry, PromptRecord]]) -> None:
        """Sample every group in `batch` together and forward each as a rollout record; a group whose reward
        fails is dead-lettered with the reason, the others go on."""
        cfg = self.ctx.config
        start = time.perf_counter()
        groups = self.engine.generate_groups(
            [prompt.prompt_ids for _, prompt in batch],
            [group_seed(cfg.trainer.seed, prompt.group_id) for _, prompt in batch],
            cfg.rollout.n,
            cfg.rollout.temperature,
            cfg.rollout.top_p,
            cfg.rollout.max_new_tokens,
            topk=cfg.rollout.student_topk,
        )
        elapsed = (time.perf_counter() - start) / len(batch)
        ids, streams, payloads = [], [], []
        for (entry, prompt), samples in zip(batch, groups, strict=True):
            rewards = None
            if self.reward is not None:
                try:
                    rewards = self._rewards(prompt, samples)
                except RewardError as err:
                    self._dead_letter_for(entry, err)
                    continue
            record = RolloutRecord(
                run_id=prompt.run_id,
                group_id=prompt.group_id,
                sample_ids=[f"{prompt.group_id}/{i}" for i in range(len(samples))],
                step=prompt.step,
                policy_version=self.engine.version,
                prompt_ids=prompt.prompt_ids,
                response_ids=np.concatenate([s.response_ids for s in samples]),
                response_lengths=np.array([len(s.response_ids) for s in samples], dtype=np.int32),
                behaviour_logprobs=np.concatenate([s.logprobs for s in samples]),
                rewards=rewards,
                extra=prompt.extra,
                timing={"generate_s": elapsed, "load_weights_s": self._unreported_load_s},
                student_topk_ids=np.concatenate([s.topk_ids for s in samples]) if cfg.rollout.student_topk else None,
            )
            self._unreported_load_s = 0.0  # the load that preceded this batch, reported once, with its first group
            ids.append(entry.id)
            streams.append(self._stream_of(prompt))
            payloads.append(encode_rollout_record(record))
        self.consumer.forward(ids, streams, payloads)
        self.done += len(ids)

    def _decode(self, payload: bytes) -> PromptRecord:
        prompt = decode_prompt_record(payload, self.ctx.max_record_bytes)
        check_prompt_record_within(prompt, self.limits)
        self._stream_of(prompt)  # names a teacher of the run
        return prompt

    def _stream_of(self, prompt: PromptRecord) -> str:
        """The rollouts stream of the prompt's teacher: with model.teachers, the one its data.teacher_key names."""
        cfg = self.ctx.config
        if not cfg.model.teachers:
            return self.ctx.names.rollouts
        teacher = prompt.extra.get(cfg.data.teacher_key)
        if teacher not in cfg.model.teachers:
            raise RecordError(
                f"the prompt names teacher {teacher!r} in its {cfg.data.teacher_key!r} field, which is not one of "
                f"model.teachers ({', '.join(sorted(cfg.model.teachers))})"
            )
        return self.ctx.names.rollouts_for(teacher)

    def _rewards(self, prompt: PromptRecord, samples) -> np.ndarray:
        assert self.reward is not None
        return self.reward.score(
            self.tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True),
            [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples],
            prompt.extra,
        )

    def close(self) -> None:
        if self.reward is not None:
            self.reward.close()

    def _refresh_weights(self, min_version: int) -> bool:
        """Load the published weights when they changed; wait while the engine is older than `min_version`.

        The published version can go down: a learner resumed from a checkpoint publishes its older weights.
        """
        while True:
            latest = self.weights.latest()
            if latest is not None and latest[0] != self.engine.version and latest[0] not in self.unloadable:
                version, handle = latest
                if self.weights.needs_shared_directory and not self.weights.directory.is_dir():
                    raise RunFailedError(
                        f"the learner published weights version {version}, but this machine has no weights "
                        f"directory {self.weights.directory}: a rollout worker started with `gkd-async worker` "
                        "needs the learner's logging.dir on a shared file system with pipeline.weight_transport="
                        "file; pipeline.weight_transport=redis (the default) needs no shared disk"
                    )
                try:
                    started = time.perf_counter()
                    state = self.weights.read(handle)  # None: replaced since it was announced
                    if state is not None:
                        self.engine.load_weights(state, version)
                        self._unreported_load_s += time.perf_counter() - started
                        self.liveness.log.info("loaded weights", version=version)
                        continue
                except RedisUnavailableError:
                    raise
                except Exception as exc:
                    self.unloadable[version] = f"{type(exc).__name__}: {exc}"
                    self.liveness.log.warning(
                        "weights version skipped: it could not be loaded", version=version, error=repr(exc)
                    )
                    continue
            if self.engine.version >= min_version:
                return True
            if latest is not None and latest[0] >= min_version and latest[0] in self.unloadable:
                raise RunFailedError(
                    f"this rollout worker needs student weights of version {min_version} or newer, and version "
                    f"{latest[0]} could not be loaded ({self.unloadable[latest[0]]})"
                )
            if self.ctx.stopped():
                return False
            self.liveness.beat(version=self.engine.version, waiting_for=min_version)
            time.sleep(0.02)
