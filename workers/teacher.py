"""TeacherScorer: rollouts in, the teacher's top-k log-probs (or, gkd.teacher_signal=hidden, its last hidden states)
for every response token attached, out.

Several scorers share the load through one consumer group; a scorer that dies leaves its entries
pending, and another reclaims them after pipeline.claim_timeout_s. A served teacher that stops answering
is treated the same way: the scorer leaves what it holds pending, reads nothing new until the server
answers again, and gives up after teacher.openai.unavailable_timeout_s.
"""

from __future__ import annotations

import time
from itertools import pairwise

import numpy as np

from gkd_async.config.loading import for_teacher
from gkd_async.config.plan import RunPlan
from gkd_async.engines import make_teacher_engine
from gkd_async.engines.cross_tokenizer import Branches, TokenBridge
from gkd_async.errors import ConfigError, RecordError, TeacherServerUnavailableError
from gkd_async.models.hidden_signal import check_plain_head
from gkd_async.models.loading import load_tokenizer, model_vocab_size
from gkd_async.preflight.checks import check_served_teacher, check_teacher_fits_student
from gkd_async.transport.limits import RecordLimits, check_rollout_within
from gkd_async.transport.records import (
    RolloutRecord,
    ScoredRecord,
    decode_rollout_record,
    encode_scored_record,
)
from gkd_async.transport.streams import StreamEntry
from workers.common import RunContext, StageWorker, teacher_role

ROLE = "teacher"  # with several teachers, each one's scorers have the role teacher:<name> (teacher_role)
GROUP = "teacher"


class TeacherScorer(StageWorker):
    """Scores for the run's teacher, or with model.teachers for the one named `teacher`, from its own stream."""

    role = ROLE

    def __init__(self, ctx: RunContext, name: str | None = None, teacher: str | None = None) -> None:
        teachers = ctx.config.model.teachers
        if teachers and teacher is None:
            raise ConfigError(
                f"this run has several teachers ({', '.join(sorted(teachers))}): a scorer scores for one of them; "
                "name it with --teacher NAME"
            )
        if teacher is not None and not teachers:
            raise ConfigError(f"--teacher {teacher}: this run has one teacher (model.teacher); drop --teacher")
        self.teacher = teacher
        self.role = teacher_role(teacher)
        super().__init__(ctx, name)
        cfg = for_teacher(ctx.config, teacher)
        # The shared vocabulary: the teacher's top-k is taken over it, and every record must fit it.
        if cfg.teacher.backend == "openai":
            self.engine = make_teacher_engine(cfg, pad_id=-1)
            self.vocab_size = check_served_teacher(cfg, self.engine)
        else:
            self.vocab_size = check_teacher_fits_student(cfg)
            self.engine = make_teacher_engine(
                cfg, load_tokenizer(cfg.model.teacher, cfg.model.trust_remote_code).pad_token_id
            )
        self.bridge, self.teacher_vocab = None, self.vocab_size
        if cfg.teacher.cross_tokenizer:
            self.teacher_vocab = model_vocab_size(cfg.model.teacher, cfg.model.trust_remote_code)
            self.bridge = TokenBridge(
                load_tokenizer(cfg.model.student, cfg.model.trust_remote_code),
                load_tokenizer(cfg.model.teacher, cfg.model.trust_remote_code),
                self.teacher_vocab,
                cfg.data.apply_chat_template,
                cfg.data.chat_template_kwargs,
            )
        self.limits = RecordLimits.for_run(cfg, self.vocab_size)
        self.plan = RunPlan.of(cfg)
        if self.plan.hidden_signal:  # the learner turns the hidden states into logits with the plain output layer
            check_plain_head(self.engine.model.config, cfg.model.teacher)
        self.unavailable_since: float | None = None
        self.logprob_dtype = np.float16 if cfg.teacher.logprob_dtype == "float16" else np.float32
        self.consumer = ctx.consumer(ctx.names.rollouts_for(teacher), GROUP, self.name)

    def step(self) -> None:
        cfg = self.ctx.config
        self.liveness.beat(scored=self.done)
        if self.unavailable_since is not None and not self._teacher_back():
            return
        work: list[tuple[StreamEntry, RolloutRecord]] = self.read_records(cfg.teacher.batch_size, self._decode)
        if work:
            try:
                self.each_alone_on_failure(work, self._score, lambda item: item[0])
            except TeacherServerUnavailableError as exc:
                self._teacher_gone(exc, len(work))

    def _decode(self, payload: bytes) -> RolloutRecord:
        record = decode_rollout_record(payload, self.ctx.max_record_bytes)
        check_rollout_within(record, self.limits)
        wanted = self.plan.student_topk if self.plan.student_ids_scored else 0
        held = 0 if record.student_topk_ids is None else record.student_topk_ids.shape[1]
        if wanted and held != wanted:
            raise RecordError(
                f"the rollout carries the student's top-{held} ids; gkd.topk_source={self.ctx.config.gkd.topk_source} "
                f"needs rollout.student_topk={wanted} (a rollout worker of another config?)"
            )
        return record

    def _score_across_tokenizers(self, records: list[RolloutRecord], k: int) -> list[tuple[np.ndarray, ...]]:
        """Each sample re-tokenized for the teacher, scored, its rows mapped back onto the student's tokens."""
        cfg, bridge = self.ctx.config, self.bridge
        pairs, rows = [], []
        for record in records:
            prompt = bridge.teacher_prompt(record.prompt_ids, record.extra)
            for i in range(record.n):
                response, row_map = bridge.teacher_response(record.response(i))
                pairs.append((prompt, response))
                rows.append(row_map)
        temperature, batch = cfg.gkd.distill_temperature, cfg.teacher.batch_size
        scores = self.engine.score(pairs, k, temperature, batch, vocab_limit=self.teacher_vocab, sampled=True)
        # each teacher token's own log-prob too: the chain rule's factors along a student token's span
        branches = [Branches() for _ in pairs]
        if per_row := cfg.teacher.cross_tokenizer_branches:  # the rows the mapping lacks, scored in a second pass
            requests = [
                bridge.branch_requests(ids, lps, row_map, response, own, per_row)
                for (ids, lps, own), row_map, (_, response) in zip(scores, rows, pairs, strict=True)
            ]
            after = self.engine.score_branches(pairs, requests, k, temperature, batch, vocab_limit=self.teacher_vocab)
            branches = [Branches.scored(wanted, *rows) for wanted, rows in zip(requests, after, strict=True)]
        return [
            bridge.student_rows(ids, lps, row_map, k, response, own, held)
            for (ids, lps, own), row_map, (_, response), held in zip(scores, rows, pairs, branches, strict=True)
        ]

    def _teacher_gone(self, exc: TeacherServerUnavailableError, held: int) -> None:
        """Leave the entries in hand pending (reclaimed after pipeline.claim_timeout_s), as a dead scorer would."""
        now = time.monotonic()
        if self.unavailable_since is None:
            self.unavailable_since = now
        self.liveness.log.warning("the teacher does not answer; its entries stay pending", held=held, error=str(exc))
        self._check_patience(exc)

    def _teacher_back(self) -> bool:
        """Whether the served teacher answers again; waits a little when it does not."""
        if self.engine.available():
            self.liveness.log.info("the teacher answers again", down_s=round(time.monotonic() - self.unavailable_since))
            self.unavailable_since = None
            return True
        self._check_patience(TeacherServerUnavailableError("the teacher server still does not answer"))
        time.sleep(min(1.0, self.ctx.config.pipeline.read_block_ms / 1000))
        return False

    def _check_patience(self, exc: TeacherServerUnavailableError) -> None:
        patience = self.ctx.config.teacher.openai.unavailable_timeout_s
        down = time.monotonic() - (self.unavailable_since or time.monotonic())
        if down > patience:
            raise TeacherServerUnavailableError(
                f"{exc}; it has not answered for {down:.0f} s (teacher.openai.unavailable_timeout_s={patience:g}). "
                "Its entries stay pending in Redis: restart the server and resume the run"
            ) from None

    def _score(self, work: list[tuple[StreamEntry, RolloutRecord]]) -> None:
        """Score every record in `work` together and forward each with its top-k rows."""
        cfg = self.ctx.config
        records = [record for _, record in work]
        start = time.perf_counter()
        pairs = [(r.prompt_ids, r.response(i)) for r in records for i in range(r.n)]
        plan = self.plan
        if self.bridge is None:
            extra = None  # gkd.topk_source=student or union: the teacher's log-probs at the student's top-k ids too
            if plan.student_ids_scored:
                extra = [r.student_topk_ids[a:b] for r in records for a, b in pairwise(r.response_offsets())]
            hidden = {"hidden_dtype": cfg.teacher.hidden_dtype} if plan.hidden_signal else {}  # HF teacher only
            scores = self.engine.score(
                pairs, plan.teacher_topk, cfg.gkd.distill_temperature, cfg.teacher.batch_size,
                vocab_limit=self.vocab_size, sampled=True, extra_ids=extra, **hidden,
            )  # fmt: skip
        else:
            scores = self._score_across_tokenizers(records, plan.topk)
        elapsed = time.perf_counter() - start
        payloads, offset = [], 0
        for record in records:
            mine = scores[offset : offset + record.n]
            offset += record.n
            scored = ScoredRecord(
                rollout=record,
                teacher_id=self.name,
                temperature=cfg.gkd.distill_temperature,
                topk_ids=np.concatenate([s[0] for s in mine]) if mine else np.zeros((0, plan.topk), np.int32),
                topk_logprobs=np.concatenate([s[1] for s in mine]).astype(self.logprob_dtype),
                token_logprobs=np.concatenate([s[2] for s in mine]).astype(np.float32) if self.bridge is None else None,
                timing={"score_s": elapsed / len(records)},
                teacher_hidden=np.concatenate([s[3] for s in mine]) if plan.hidden_signal else None,
            )
            payloads.append(encode_scored_record(scored))
        self.consumer.forward([entry.id for entry, _ in work], self.ctx.names.scored, payloads)
        self.done += len(records)
