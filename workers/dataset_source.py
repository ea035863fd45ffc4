"""DatasetSource: the rollout stage of `rollout.source=dataset`. Each admitted prompt comes from a data set
the teacher scored once (`gkd-async score`); its stored response and teacher log-probs go to the learner
as a scored record, with no generation and no teacher."""

from __future__ import annotations

import numpy as np

from gkd_async.data.scored_dataset import ROW_FIELD, ScoredDataset
from gkd_async.errors import RecordError
from gkd_async.transport.records import (
    PromptRecord,
    RolloutRecord,
    ScoredRecord,
    decode_prompt_record,
    encode_scored_record,
)
from workers.common import RunContext, StageWorker

ROLE = "rollout"  # it stands in for the rollout workers: the learner waits on their heartbeats
GROUP = "rollout"


class DatasetSource(StageWorker):
    role = ROLE

    def __init__(self, ctx: RunContext, name: str | None = None) -> None:
        super().__init__(ctx, name)
        self.dataset = ScoredDataset(ctx.config.data.scored_dir)
        self.consumer = ctx.consumer(ctx.names.prompts, GROUP, self.name)

    def _decode(self, payload: bytes) -> PromptRecord:
        """The prompt, which must name a row of the scored data set."""
        prompt = decode_prompt_record(payload, self.ctx.max_record_bytes)
        row = prompt.extra.get(ROW_FIELD)
        if not isinstance(row, int) or row not in self.dataset.where:
            raise RecordError(f"the prompt names no row of the scored data set ({ROW_FIELD}={row!r})")
        return prompt

    def step(self) -> None:
        cfg = self.ctx.config
        self.liveness.beat(produced=self.done)
        ids, payloads = [], []
        for entry, prompt in self.read_records(cfg.rollout.batch_size, self._decode):
            stored = self.dataset.read(prompt.extra[ROW_FIELD])
            length = len(stored.response_ids)
            rollout = RolloutRecord(
                run_id=prompt.run_id,
                group_id=prompt.group_id,
                sample_ids=[f"{prompt.group_id}/0"],
                step=prompt.step,
                policy_version=0,  # off-policy, as supervised KD on teacher samples
                prompt_ids=stored.prompt_ids,
                response_ids=stored.response_ids,
                response_lengths=np.array([length], np.int32),
                behaviour_logprobs=np.zeros(length, np.float32),  # unused: no policy-gradient term here
                extra=prompt.extra,
            )
            scored = ScoredRecord(
                rollout=rollout,
                teacher_id=str(self.dataset.manifest["teacher"]),
                temperature=self.dataset.temperature,
                topk_ids=stored.topk_ids,
                topk_logprobs=stored.topk_logprobs,
                token_logprobs=stored.token_logprobs,
            )
            ids.append(entry.id)
            payloads.append(encode_scored_record(scored))
        if ids:
            self.consumer.forward(ids, self.ctx.names.scored, payloads)
            self.done += len(ids)
