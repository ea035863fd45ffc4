"""Distilling from a teacher of another tokenizer (`teacher.cross_tokenizer=true`).

The teacher scores the student's sample re-tokenized as text: the prompt from its source (chat messages
or prompt string, carried in the record's `gkd_prompt` field) through the teacher's own chat template, the
response decoded from the student's tokens and encoded with the teacher's. Its rows are then mapped back
onto the student's tokens, in the spirit of the vocabulary mapping of GOLD (Hugging Face TRL's "General
On-Policy Logit Distillation", 2025) and of ULD (Boizard et al., "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs", 2024), by character spans:

- Anchor: student token i, starting at character s of the response text, looks at the teacher token that
  covers s (for the end of sequence, the response's last teacher token), at the teacher's row for it, and
  at the part of that token's text before s, the prefix (empty when the two tokens start together).
- Next student token: the teacher's tokens at that row whose text begins with the prefix are what the
  teacher says about the text from the token's start; each one longer than the prefix counts for the
  student token its remaining text begins with (the first token of the student's encoding of it), and the
  probabilities are summed per student token and divided by the mass of the tokens that begin with the
  prefix. A teacher token that is exactly the prefix ends where the student token starts: at the end of
  the response its mass passes on to the next row (what the teacher says follows it, the end of sequence
  among it); elsewhere that row is conditioned on a different token, and its mass stays in the tail.
- Chain: a student token that starts with a teacher token and spans m more (a BPE student, a character-level
  teacher) walks their rows: its own probability is P(t1) P(t2 | t1) ... from the response's own tokens'
  log-probs, and at each row every other teacher token in the top-k ends the path there, the text so far plus
  it counting for the student token it begins with (`TokenBridge._chain`). A string that does not decide its
  token yet (the pairs student's "9", which may be "9" or "98") is split by the teacher's row after it, which the
  teacher scores in a second pass for the likeliest few a row (`Branches`, `TeacherEngine.score_branches`).
- Given the student's tokens so far: where a student token starts at a teacher token's start, a teacher token
  that would merge into the student's previous token (the pairs student's "2" then "3" is its "23") is no
  continuation the student's tokenization has; its mass is dropped and the row renormalised (`_merges`; only the
  first teacher token after the boundary is checked).
- Approximations: the teacher's row is conditioned on its own tokenization of the text before the
  anchored token (the canonical one, not a sum over all tokenizations); only its top-k tokens are seen, so
  the prefix's mass is that of the top-k tokens that begin with it; outside a chain, a teacher token shorter
  than the student's next token counts for that token whatever follows it; teacher tokens the student cannot encode
  (special tokens but the end of sequence) fall into the tail bucket, as tokens outside the top-k do.

The mapped rows are the student's top-k over the mapped tokens, with -inf for entries absent when fewer
than k distinct student tokens remain (loss/topk.py treats them as absent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerBase

MERGE_CACHE = 1 << 20  # (token, text) pairs `TokenBridge._merges` remembers before it starts over
PROMPT_FIELD = "gkd_prompt"  # the prompt's source, JSON: {"messages": [...]} or {"prompt": "..."}


def prompt_source(row_prompt: str | None, messages: list[dict[str, str]] | None) -> str:
    """The `gkd_prompt` value of a data row: what the teacher re-templates with its own chat template."""
    return json.dumps({"messages": messages} if messages is not None else {"prompt": row_prompt})


class Anchor(NamedTuple):
    """Where a student token's teacher row is: the teacher row, the text of its token before the student
    token starts, whether that text is the whole of the teacher's token (the end of the response), and how many
    teacher tokens after the row's own continue the student token (it starts where the row's token starts and
    spans several: the chain rule walks their rows)."""

    row: int
    prefix: str
    ends_token: bool
    chain: int = 0
    token: int = -1  # the student's token (-1: the end of sequence)
    before: str = ""  # the text of the student's token before it (none for the first)


@dataclass
class Branches:
    """The teacher's rows after strings that leave a student token's path (`TokenBridge._chain`): `rows` maps
    (teacher row, teacher token read there instead of the response's own) to that token's next row, top-k ids
    and log-probs (`TeacherEngine.score_branches`); `wanted` collects (probability, row, token) of the strings
    that needed one and found none."""

    rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    wanted: list[tuple[float, int, int]] = field(default_factory=list)

    @classmethod
    def scored(cls, wanted: list[tuple[int, int]], ids: np.ndarray, logprobs: np.ndarray) -> Branches:
        """The rows `score_branches` returned ([m, k] each) for the (row, token) strings `wanted`, in order."""
        return cls({key: (ids[j], logprobs[j]) for j, key in enumerate(wanted)})

    def requests(self, per_row: int) -> list[tuple[int, int]]:
        """The `per_row` most probable wanted strings at each row, as (row, token) for `score_branches`."""
        best: dict[int, list[tuple[float, int]]] = {}
        for p, row, token in self.wanted:
            best.setdefault(row, []).append((p, token))
        return [(row, token) for row in sorted(best) for _, token in sorted(best[row], reverse=True)[:per_row]]


class TokenBridge:
    """Maps a student sample to the teacher's tokens, and the teacher's top-k rows back onto the student's."""

    def __init__(
        self,
        student: PreTrainedTokenizerBase,
        teacher: PreTrainedTokenizerBase,
        teacher_rows: int,
        apply_chat_template: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """`apply_chat_template` and `chat_template_kwargs` as data.* give them to the student's template."""
        self.student, self.teacher = student, teacher
        self.apply_chat_template, self.chat_template_kwargs = apply_chat_template, dict(chat_template_kwargs or {})
        special = set(teacher.all_special_ids)
        ids = [t for t in range(min(len(teacher), teacher_rows)) if t not in special]
        self.text: dict[int, str] = dict(zip(ids, teacher.batch_decode([[t] for t in ids]), strict=True))
        self._first: dict[str, tuple[int | None, bool]] = {}  # text -> its first student token, and undecided
        self._merge: dict[tuple[str, str], bool] = {}  # (student token's text, text after it) -> `_merges`
        # Every text a student token has more of: a string that ends in one of these may still be the start of a
        # longer student token (the pairs tokenizer's "2" of "25", Qwen's " th" of " the"), so the token it encodes
        # to on its own is not the student's next token.
        plain = [t for t in range(len(student)) if t not in set(student.all_special_ids)]
        self._extendable = {
            text[:i] for text in student.batch_decode([[t] for t in plain]) for i in range(1, len(text))
        }

    def teacher_prompt(self, prompt_ids: np.ndarray, extra: Mapping[str, object]) -> np.ndarray:
        """The prompt as the teacher reads it: its source through the teacher's chat template; without a
        source (a record from elsewhere), the student's prompt decoded, template and all."""
        source = extra.get(PROMPT_FIELD)
        if isinstance(source, str):
            fields = json.loads(source)
            messages = fields.get("messages")
            if messages is None and self.apply_chat_template and self.teacher.chat_template is not None:
                messages = [{"role": "user", "content": fields["prompt"]}]
            if messages is not None:
                text = self.teacher.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
                )
            else:
                text = fields["prompt"]
        else:
            text = self.student.decode(prompt_ids)
        return np.asarray(self.teacher(text, add_special_tokens=False)["input_ids"], np.int32)

    def teacher_response(self, response_ids: np.ndarray) -> tuple[np.ndarray, list[Anchor]]:
        """The response in the teacher's tokens, and for each student token its anchor: the teacher row of the
        teacher token that covers the character where the student token starts (for the end of sequence,
        the last one), the text of that teacher token before it, and whether that is all of the token."""
        eos = len(response_ids) > 0 and int(response_ids[-1]) == self.student.eos_token_id
        body = [int(t) for t in (response_ids[:-1] if eos else response_ids)]
        pieces = self.student.batch_decode([[t] for t in body]) if body else []
        text = "".join(pieces)
        starts = np.cumsum([0, *(len(p) for p in pieces)])
        encoded = self.teacher(text, add_special_tokens=False, return_offsets_mapping=True)
        teacher_ids = list(encoded["input_ids"])
        spans = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
        anchors = []
        for i, start in enumerate(starts[: len(body) + (1 if eos else 0)]):
            start = int(start)
            row = next((j for j, (a, b) in enumerate(spans) if a <= start < b), None)
            if row is None:  # the end of the text: the last token, when there is one, else the row after it
                row = len(spans) - 1 if spans and start == len(text) else len(spans)
            prefix = text[spans[row][0] : start] if row < len(spans) else ""
            end = int(starts[i + 1]) if i < len(body) else start  # the end of sequence spans no text
            chain = 0 if prefix else sum(1 for a, _ in spans[row + 1 :] if start < a < end)
            token, before = body[i] if i < len(body) else -1, pieces[i - 1] if i else ""
            anchors.append(Anchor(row, prefix, bool(prefix) and start == spans[row][1], chain, token, before))
        if eos:
            teacher_ids.append(self.teacher.eos_token_id)
        return np.asarray(teacher_ids, np.int32), anchors

    def student_rows(
        self,
        teacher_ids: np.ndarray,
        teacher_logprobs: np.ndarray,
        anchors: list[Anchor],
        k: int,
        response: np.ndarray | None = None,
        sampled: np.ndarray | None = None,
        branches: Branches | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """[R, k] student ids and log-probs: the teacher's probability of each next student token at every
        anchor, summed over the teacher tokens that begin with it, best first; -inf (absent) past those. A
        student token that spans several teacher tokens takes the chain rule along their rows (`_chain`), which
        needs the teacher's `response` ids and each one's own log-prob, `sampled`, and reads the teacher's rows
        after the strings that leave its path in `branches` (`branch_requests` says which to score)."""
        ids = np.zeros((len(anchors), k), np.int32)
        logprobs = np.full((len(anchors), k), -np.inf, np.float32)
        for i, anchor in enumerate(anchors):
            if not anchor.prefix and anchor.token >= 0 and response is not None and sampled is not None:
                mapped = self._chain(teacher_ids, teacher_logprobs, anchor, response, sampled, branches or Branches())
            else:
                mapped = self._next_tokens(teacher_ids, teacher_logprobs, anchor, response, sampled, branches)
            best = sorted(((t, p) for t, p in mapped.items() if p > 0), key=lambda item: -item[1])[:k]
            taken = {student_id for student_id, _ in best}
            fill = (t for t in range(2 * k) if t not in taken)  # distinct ids for the absent entries
            ids[i] = [student_id for student_id, _ in best] + [next(fill) for _ in range(k - len(best))]
            logprobs[i, : len(best)] = [np.log(p) for _, p in best]
        return ids, logprobs

    def branch_requests(
        self,
        teacher_ids: np.ndarray,
        teacher_logprobs: np.ndarray,
        anchors: list[Anchor],
        response: np.ndarray,
        sampled: np.ndarray,
        per_row: int,
    ) -> list[tuple[int, int]]:
        """The (row, teacher token) strings whose next row the mapping lacks, the `per_row` likeliest a row: what
        `TeacherEngine.score_branches` is asked for before `student_rows` maps with them: the strings that do not
        decide their student token, in the chain rule's walks (`_chain`) and at the other rows (`_next_tokens`:
        the end of sequence's, after a response the teacher would go on with)."""
        branches = Branches()
        for anchor in anchors:
            if not anchor.prefix and anchor.token >= 0:
                self._chain(teacher_ids, teacher_logprobs, anchor, response, sampled, branches)
            else:
                self._next_tokens(teacher_ids, teacher_logprobs, anchor, response, sampled, branches)
        return branches.requests(per_row)

    def _next_tokens(
        self,
        teacher_ids: np.ndarray,
        teacher_logprobs: np.ndarray,
        anchor: Anchor,
        response: np.ndarray | None = None,
        sampled: np.ndarray | None = None,
        branches: Branches | None = None,
    ) -> dict:
        """Student token -> probability at the anchor's row given that the teacher's token there begins with the
        anchor's prefix: each teacher token that extends the prefix counts for the student token its remaining
        text begins with (when that text does not decide it, as `_chain` does: split by the teacher's row after
        it from `branches`, else the tail); one that is exactly the prefix passes its mass on to the next row's
        tokens when the row's own token ends there too (the next row is then what follows it), else to the tail."""
        row, prefix = anchor.row, anchor.prefix
        before, cut = self._conditioned_on(anchor.before, prefix, response, row), 0.0
        mapped: dict[int, float] = {}

        def count(student_id: int | None, p: float) -> None:
            if student_id is not None:
                mapped[student_id] = mapped.get(student_id, 0.0) + p

        given = 0.0  # the mass of the tokens that begin with the prefix: what the probabilities are given
        own = -1  # the response's own token when it is the prefix: its probability is known, in the top-k or not
        known = anchor.ends_token and response is not None and sampled is not None and row + 1 < len(teacher_ids)
        if known and self.text.get(int(response[row])) == prefix:
            own, p = int(response[row]), float(np.exp(sampled[row]))
            given += p
            after = Anchor(row + 1, "", False, before=anchor.before)
            for student_id, q in self._next_tokens(
                teacher_ids, teacher_logprobs, after, response, None, branches
            ).items():
                mapped[student_id] = mapped.get(student_id, 0.0) + p * q
        for teacher_id, logprob in zip(teacher_ids[row].tolist(), teacher_logprobs[row].tolist(), strict=True):
            if teacher_id == own:
                continue  # counted above
            p = float(np.exp(logprob))
            if teacher_id == self.teacher.eos_token_id:
                if not prefix:
                    mapped[self.student.eos_token_id] = mapped.get(self.student.eos_token_id, 0.0) + p
                    given += p
                continue
            text = self.text.get(teacher_id)
            if text is None or not text.startswith(prefix):
                continue
            if before and self._merges(before, text):
                cut += p
                continue
            given += p
            if len(text) > len(prefix):
                rest = text[len(prefix) :]
                if (first := self._first_student_token(rest)) is not None or branches is None:
                    count(first, p)
                elif (after := branches.rows.get((row, teacher_id))) is not None:  # undecided: its own row says
                    self._what_follows(*after, self._first_student_token(rest, whatever_follows=True), rest, p, count)
                elif self._open_ended(rest):
                    branches.wanted.append((p, row, teacher_id))
            elif anchor.ends_token and row + 1 < len(teacher_ids):
                next_row = Anchor(row + 1, "", False, before=anchor.before)
                for student_id, q in self._next_tokens(
                    teacher_ids, teacher_logprobs, next_row, response, None, branches
                ).items():
                    mapped[student_id] = mapped.get(student_id, 0.0) + p * q
        if prefix and given > 0:
            mapped = {student_id: p / given for student_id, p in mapped.items()}
        return _renormalized(mapped, cut)

    def _chain(
        self,
        teacher_ids: np.ndarray,
        teacher_logprobs: np.ndarray,
        anchor: Anchor,
        response: np.ndarray,
        sampled: np.ndarray,
        branches: Branches,
    ) -> dict:
        """Student token -> probability for a student token that starts where a teacher token starts, along the
        response's own teacher tokens t1..tm+1 that it spans (m = `anchor.chain`, 0 for one): the text so far has
        probability P(t1) P(t2 | t1) ... (each the response token's own log-prob, exact, in the top-k or not). At
        each row every other teacher token u of the top-k ends the path: the text so far + u has probability
        P(t<=j) P(u | t<=j) and counts for the student token it begins with, when that string decides it
        (`_first_student_token`). At the last row the response's own token ends the path at the student token's
        end: when a longer student token could begin with the student token's text (the pairs tokenizer's "6" of
        "67"), the next row says what follows it, each continuation counting for the token the text + it begins
        with (the student token itself where it does not merge). A string that leaves the path and does not
        decide its token is continued the same way by its own row, the teacher's row after it (`branches`,
        scored in a second pass), and goes to the tail where that row was not scored (the row after the
        response's own token is not its row: borrowing it taught the pairs student "90" where the teacher says
        "98"); `branches.wanted` collects those strings."""
        mapped: dict[int, float] = {}
        mass, so_far = 1.0, ""
        own = self.student.decode([anchor.token])
        before, cut = self._conditioned_on(anchor.before, "", response, anchor.row), 0.0

        def count(student_id: int | None, p: float) -> None:
            if student_id is not None:
                mapped[student_id] = mapped.get(student_id, 0.0) + p

        for j in range(anchor.chain + 1):
            row = anchor.row + j
            actual = int(response[row])
            if j == anchor.chain:  # the path's own end, weighed by its own log-prob: in the top-k or not
                teacher_ids_row = [actual, *(t for t in teacher_ids[row].tolist() if t != actual)]
                logprobs_row = [float(sampled[row])] + [
                    lp for t, lp in zip(teacher_ids[row].tolist(), teacher_logprobs[row].tolist(), strict=True)
                    if t != actual
                ]  # fmt: skip
            else:
                teacher_ids_row, logprobs_row = teacher_ids[row].tolist(), teacher_logprobs[row].tolist()
            for teacher_id, logprob in zip(teacher_ids_row, logprobs_row, strict=True):
                if teacher_id == actual and j < anchor.chain:
                    continue  # followed below, to the next row
                p = mass * float(np.exp(logprob))
                if teacher_id == self.teacher.eos_token_id:  # the text ends after the text so far: nothing follows
                    end = self._first_student_token(so_far, whatever_follows=True) if so_far else None
                    count(self.student.eos_token_id if not so_far else end, p)
                    continue
                if (text := self.text.get(teacher_id)) is None:
                    continue  # a special token: the tail
                if j == 0 and before and self._merges(before, text):
                    cut += p  # the student's tokens so far would not be its own tokenization of that text
                    continue
                whole = so_far + text
                if teacher_id == actual and whole == own and own in self._extendable and row + 1 < len(response):
                    self._what_follows(teacher_ids[row + 1], teacher_logprobs[row + 1], anchor.token, own, p, count)
                elif teacher_id == actual and whole.startswith(own):  # the response's own text: the student's token
                    count(anchor.token, p)
                elif (first := self._first_student_token(whole)) is not None or not self._open_ended(whole):
                    count(first, p)  # decided, or not the student's (the tail)
                elif (after := branches.rows.get((row, teacher_id))) is not None:  # undecided: its own row says
                    self._what_follows(*after, self._first_student_token(whole, whatever_follows=True), whole, p, count)
                else:  # undecided and no row of its own: the tail
                    branches.wanted.append((p, row, teacher_id))
            if j < anchor.chain:
                mass *= float(np.exp(sampled[row]))
                so_far += self.text[actual]
        return _renormalized(mapped, cut)

    def _what_follows(self, ids: np.ndarray, logprobs: np.ndarray, token: int, own: str, p: float, count) -> None:
        """Mass `p` of the student token's text `own`, split by the teacher's next row: each continuation u counts
        for the student token `own` + u begins with (`token` itself where u does not merge into it, or the end)."""
        for teacher_id, logprob in zip(ids.tolist(), logprobs.tolist(), strict=True):
            q = p * float(np.exp(logprob))
            if teacher_id == self.teacher.eos_token_id:
                count(token, q)
            elif (text := self.text.get(teacher_id)) is not None:
                merged = self._first_student_token(own + text, whatever_follows=True)
                count(token if merged == token else self._first_student_token(own + text), q)

    def _conditioned_on(self, before: str, prefix: str, response: np.ndarray | None, row: int) -> str:
        """The student's previous token's text when the row's next-token probabilities are to be conditioned on
        the student's own tokenization (`_merges`), else "": only at a row read at a teacher token's start (no
        prefix), after a token of the response, and when the response's own text there does not merge either
        (then the sample is not the student's tokenization of its text, and there is nothing to condition on)."""
        if prefix or not before or "\ufffd" in before:  # no previous token, or a partial character
            return ""
        own = self.text.get(int(response[row])) if response is not None and row < len(response) else None
        return "" if own is not None and self._merges(before, own) else before

    def _merges(self, before: str, text: str) -> bool:
        """Whether the student never has a token starting with `text` right after its token `before`: its encoding
        of the two texts together does not begin with that token (the pairs tokenizer's "2" then "3" is "23";
        Qwen's "the" then "re" is "there"). Such a continuation's mass is not the student's next token: the row
        is the teacher's distribution given the student's tokens so far, so it is dropped and the rest renormalised
        (only the teacher token right after the boundary is checked)."""
        if (before, text) not in self._merge:
            if len(self._merge) > MERGE_CACHE:
                self._merge.clear()
            head = self.student(before, add_special_tokens=False)["input_ids"]
            both = self.student(before + text, add_special_tokens=False)["input_ids"]
            self._merge[before, text] = both[: len(head)] != head
        return self._merge[before, text]

    def _open_ended(self, text: str) -> bool:
        """Whether the student encodes `text` as one token that a longer one may begin with (what follows decides)."""
        self._first_student_token(text)
        return self._first[text][1]

    def _first_student_token(self, text: str, whatever_follows: bool = False) -> int | None:
        """The student token `text` begins with, when the text decides it: None (the tail) when the student
        cannot encode it, or when its first token is all of it and a longer student token begins with it too
        (what follows decides which: the teacher's rows do not say); `whatever_follows`: the first token of the
        text alone, decided or not."""
        if text not in self._first:
            ids = self.student(text, add_special_tokens=False)["input_ids"]
            first = ids[0] if ids and ids[0] != self.student.unk_token_id else None
            self._first[text] = first, first is not None and len(ids) == 1 and text in self._extendable
        first, open_ended = self._first[text]
        return None if open_ended and not whatever_follows else first


def _renormalized(mapped: dict[int, float], cut: float) -> dict[int, float]:
    """The row given that the `cut` mass (continuations the student's tokenization never has) is not taken."""
    if not 0.0 < cut < 1.0 - 1e-6:
        return mapped
    return {student_id: p / (1.0 - cut) for student_id, p in mapped.items()}
