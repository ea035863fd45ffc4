"""RolloutWorker: prompts in, n sampled responses per prompt out, from the newest student weights."""

from __future__ import annotations

import time

import numpy as np

from gkd_async.engines.hf import HFRolloutEngine
from gkd_async.errors import ConfigError, RecordError
from gkd_async.models import load_tokenizer
from gkd_async.records import RolloutRecord, decode_prompt_record, encode_rollout_record
from gkd_async.rewards import compute_reward, load_reward_function
from gkd_async.weights import WeightStore
from workers.common import RunContext, StageWorker, group_seed

ROLE = "rollout"
GROUP = "rollout"


class RolloutWorker(StageWorker):
    role = ROLE

    def __init__(self, ctx: RunContext, name: str | None = None) -> None:
        super().__init__(ctx, name)
        cfg = ctx.config
        if cfg.rollout.backend != "hf":
            raise ConfigError(f"rollout.backend={cfg.rollout.backend} is not available yet; use hf")
        tokenizer = self.tokenizer = load_tokenizer(cfg.model.student)
        reward = cfg.custom_reward_function
        self.reward_fn = load_reward_function(reward.path, reward.name) if reward.path else None
        # Supervised KD samples from the teacher, whose weights never change (its samples carry version 0).
        self.off_policy = cfg.rollout.source == "teacher"
        spec = cfg.model.teacher if self.off_policy else cfg.model.student
        self.engine = HFRolloutEngine(spec, cfg.model.dtype, tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.weights = WeightStore(ctx.client, ctx.names.weights, ctx.run_dir / "weights", ctx.redis_url)
        self.consumer = ctx.consumer(ctx.names.prompts, GROUP, self.name)

    def step(self) -> None:
        cfg = self.ctx.config
        self.liveness.beat(version=self.engine.version, produced=self.done)
        if not self.off_policy:
            self._refresh_weights(0)
        entries = self.consumer.read(cfg.rollout.batch_size, cfg.pipeline.read_block_ms)
        for entry in entries:
            try:
                prompt = decode_prompt_record(entry.payload, self.ctx.max_record_bytes)
            except RecordError as err:
                self.consumer.dead_letter(entry.id, entry.payload, f"RecordError: {err}", entry.deliveries)
                continue
            if not self.off_policy and not self._refresh_weights(prompt.min_version):
                return  # the run stopped while waiting
            start = time.perf_counter()
            samples = self.engine.generate(
                prompt.prompt_ids,
                cfg.rollout.n,
                cfg.rollout.temperature,
                cfg.rollout.top_p,
                cfg.rollout.max_new_tokens,
                seed=group_seed(cfg.trainer.seed, prompt.group_id),
            )
            rewards = None
            if self.reward_fn is not None:
                prompt_text = self.tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True)
                rewards = np.array(
                    [
                        compute_reward(
                            self.reward_fn,
                            prompt_text,
                            self.tokenizer.decode(s.response_ids, skip_special_tokens=True),
                            prompt.extra,
                        )
                        for s in samples
                    ],
                    dtype=np.float32,
                )
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
                timing={"generate_s": time.perf_counter() - start},
            )
            # One group at a time, so the teacher scores it while the next one is generated.
            self.consumer.forward([entry.id], self.ctx.names.rollouts, [encode_rollout_record(record)])
            self.done += 1

    def _refresh_weights(self, min_version: int) -> bool:
        """Load the published weights when they changed; wait while the engine is older than `min_version`.

        The published version can go down: a learner resumed from a checkpoint publishes its older weights.
        """
        while True:
            latest = self.weights.latest()
            if latest is not None and latest[0] != self.engine.version:
                version, path = latest
                self.engine.load_weights(WeightStore.load(path), version)
                self.liveness.log.info("loaded weights", version=version)
            if self.engine.version >= min_version:
                return True
            if self.ctx.stopped():
                return False
            self.liveness.beat(version=self.engine.version, waiting_for=min_version)
            time.sleep(0.02)
