"""TeacherScorer: rollouts in, the teacher's top-k log-probs for every response token attached, out.

Several scorers share the load through one consumer group; a scorer that dies leaves its entries
pending, and another reclaims them after pipeline.claim_timeout_s.
"""

from __future__ import annotations

import time

import numpy as np

from gkd_async.engines import make_teacher_engine
from gkd_async.errors import ConfigError, RecordError
from gkd_async.models import check_tokenizers_agree, load_tokenizer, model_vocab_size
from gkd_async.records import ScoredRecord, decode_rollout_record, encode_scored_record
from workers.common import RunContext, StageWorker

ROLE = "teacher"
GROUP = "teacher"


class TeacherScorer(StageWorker):
    role = ROLE

    def __init__(self, ctx: RunContext, name: str | None = None) -> None:
        super().__init__(ctx, name)
        cfg = ctx.config
        tokenizer = load_tokenizer(cfg.model.teacher)
        check_tokenizers_agree(load_tokenizer(cfg.model.student), tokenizer, cfg.model.student, cfg.model.teacher)
        vocab_size = model_vocab_size(cfg.model.teacher)
        if cfg.gkd.teacher_topk > vocab_size:
            raise ConfigError(
                f"gkd.teacher_topk={cfg.gkd.teacher_topk} exceeds the teacher's vocabulary "
                f"({vocab_size} tokens); lower it"
            )
        self.engine = make_teacher_engine(cfg, tokenizer.pad_token_id)
        self.logprob_dtype = np.float16 if cfg.teacher.logprob_dtype == "float16" else np.float32
        self.consumer = ctx.consumer(ctx.names.rollouts, GROUP, self.name)

    def step(self) -> None:
        cfg = self.ctx.config
        self.liveness.beat(scored=self.done)
        entries = self.consumer.read(cfg.teacher.batch_size, cfg.pipeline.read_block_ms)
        records, ids = [], []
        for entry in entries:
            try:
                records.append(decode_rollout_record(entry.payload, self.ctx.max_record_bytes))
                ids.append(entry.id)
            except RecordError as err:
                self.consumer.dead_letter(entry.id, entry.payload, f"RecordError: {err}", entry.deliveries)
        if not records:
            return
        start = time.perf_counter()
        pairs = [(r.prompt_ids, r.response(i)) for r in records for i in range(r.n)]
        scores = self.engine.score(pairs, cfg.gkd.teacher_topk, cfg.gkd.distill_temperature, cfg.teacher.batch_size)
        elapsed = time.perf_counter() - start
        payloads, offset = [], 0
        k = cfg.gkd.teacher_topk
        for record in records:
            mine = scores[offset : offset + record.n]
            offset += record.n
            scored = ScoredRecord(
                rollout=record,
                teacher_id=self.name,
                temperature=cfg.gkd.distill_temperature,
                topk_ids=np.concatenate([s[0] for s in mine]) if mine else np.zeros((0, k), np.int32),
                topk_logprobs=np.concatenate([s[1] for s in mine]).astype(self.logprob_dtype),
                timing={"score_s": elapsed / len(records)},
            )
            payloads.append(encode_scored_record(scored))
        self.consumer.forward(ids, self.ctx.names.scored, payloads)
        self.done += len(records)
