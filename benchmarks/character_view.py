"""A teacher of pairs of digits read a character at a time: a character-level teacher that teaches exactly what the
same-tokenizer teacher (`tiny:teacher-pairs`) teaches, for measuring the cross-tokenizer mapping alone.

`quality_experiment.py --experiment cross-tokenizer` compares a character-level teacher across tokenizers with a
teacher of the student's own tokenizer; two independently trained teachers also differ in what they say, not only in
how they cut the text. Here the character-level teacher *is* the pairs teacher: its probability of the next
character is the pairs teacher's, summed over the pair tokens that begin with it (or, inside a pair, the pair's share
of the tokens that begin with the digit before it), so the chain rule over its characters gives back the pairs
teacher's probability of each pair. Through `teacher.cross_tokenizer=true` a student of pairs should then learn what
it learns from the pairs teacher directly, up to what the mapping loses.

Not shipped: a test instrument for the benchmarks (`TeacherEngine` of the character-level tokenizer's ids).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from gkd_async.engines.base import TeacherEngine
from gkd_async.engines.hf import right_pad
from gkd_async.models.loading import load_model, load_tokenizer

FLOOR = 1e-12  # the probability given to characters the pairs teacher never begins a token with


class PairsReadByCharacter(TeacherEngine):
    """Scores character-level ids (`characters`: that tokenizer's directory) with a pairs-of-digits teacher."""

    def __init__(self, pairs_teacher: str, characters: str) -> None:
        self.model = load_model(pairs_teacher, "float32").eval()
        self.pairs, self.chars = load_tokenizer(pairs_teacher), load_tokenizer(characters)
        self.vocab_size = int(self.model.config.vocab_size)
        pieces = self.pairs.convert_ids_to_tokens(list(range(len(self.pairs))))
        char_of = {c: i for i, c in enumerate(self.chars.convert_ids_to_tokens(list(range(len(self.chars)))))}
        digit_ids = {d: [i for i, p in enumerate(pieces) if p.isdigit() and p.startswith(d)] for d in "0123456789"}
        # pair token id of "dx" -> character id of x (the second digit), per first digit d
        self.second = {
            d: {i: char_of[pieces[i][1]] for i in ids if len(pieces[i]) == 2} for d, ids in digit_ids.items()
        }
        self.single = {d: pieces.index(d) for d in "0123456789"}
        self.begins = {char_of[d]: ids for d, ids in digit_ids.items()}  # char id -> pair ids beginning with it
        self.other = [(i, char_of[p]) for i, p in enumerate(pieces) if not p.isdigit() and p in char_of]

    def _pairs_ids(self, chars: Sequence[str]) -> list[int]:
        """The pairs tokenizer's ids of a text given as characters (digit runs paired from the left)."""
        return self.pairs.convert_tokens_to_ids(self.pairs.tokenize("".join(chars)))

    def _rows(self, contexts: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
        """The pairs teacher's next-token probabilities after each context (float64), in one batched pass."""
        unique = sorted(set(contexts))
        ids, mask = right_pad([np.asarray(c, np.int64) for c in unique], self.pairs.pad_token_id)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.double()
        last = mask.sum(1) - 1
        probs = torch.softmax(logits[torch.arange(len(unique)), last], dim=-1).numpy()
        return dict(zip(unique, probs, strict=True))

    def _plan(self, chars: list[str]) -> tuple[tuple[int, ...], tuple[int, ...] | None, str | None]:
        """For the text so far: the pairs context at the last token boundary, the context after the pending digit
        as a single-digit token (when the text ends inside a pair), and that pending digit."""
        run = 0
        while run < len(chars) and chars[len(chars) - 1 - run].isdigit():
            run += 1
        if run % 2 == 0:
            return tuple(self._pairs_ids(chars)), None, None
        base = tuple(self._pairs_ids(chars[:-1]))
        return base, (*base, self.single[chars[-1]]), chars[-1]

    def _char_row(self, rows: dict, plan) -> np.ndarray:
        base, after_single, pending = plan
        row, out = rows[base], np.zeros(len(self.chars))
        if pending is None:  # at a token boundary: each character's tokens summed
            for char, ids in self.begins.items():
                out[char] = row[ids].sum()
            for token, char in self.other:
                out[char] += row[token]
        else:  # inside a pair: the pair's share of the tokens beginning with the pending digit
            total = row[self.begins[self.chars.convert_tokens_to_ids(pending)]].sum()
            for pair, char in self.second[pending].items():
                out[char] = row[pair] / total
            ends = rows[after_single]
            others = sum(ends[token] for token, _ in self.other)
            for token, char in self.other:  # the digit alone, then what is not a digit
                out[char] += row[self.single[pending]] / total * ends[token] / others
        return np.log(np.maximum(out, FLOOR))

    def score(self, pairs, k, temperature, batch_size, vocab_limit=None, sampled=False, extra_ids=None):
        if temperature != 1.0 or extra_ids is not None:
            raise ValueError("PairsReadByCharacter scores at temperature 1 over its own top-k only")
        plans = []
        for prompt, response in pairs:
            text = self.chars.convert_ids_to_tokens(np.concatenate([prompt, response]).tolist())
            plans.append([self._plan(text[: len(prompt) + j]) for j in range(len(response))])
        needed = [c for sample in plans for plan in sample for c in plan[:2] if c is not None]
        rows = {}
        for start in range(0, len(needed), 256):
            rows.update(self._rows(needed[start : start + 256]))
        out = []
        for (_, response), sample in zip(pairs, plans, strict=True):
            full = np.stack([self._char_row(rows, plan) for plan in sample])
            top = np.argsort(-full, axis=1, kind="stable")[:, :k]
            scores = (top.astype(np.int32), np.take_along_axis(full, top, 1).astype(np.float32))
            if sampled:
                scores += (full[np.arange(len(response)), response].astype(np.float32),)
            out.append(scores)
        return out


@contextlib.contextmanager
def pairs_teacher_read_by_character(pairs_teacher: Path, given_the_tokens: bool = True) -> Iterator[None]:
    """The teacher scorers of this process (pipeline.launcher=threads) score with `PairsReadByCharacter` of
    `pairs_teacher`, the run's model.teacher naming the character-level tokenizer. Not `given_the_tokens`: the
    mapping's rows are not conditioned on the student's tokens so far (`TokenBridge._merges` never true)."""
    import workers.teacher
    from gkd_async.engines.cross_tokenizer import TokenBridge

    make, merges = workers.teacher.make_teacher_engine, TokenBridge._merges
    workers.teacher.make_teacher_engine = lambda cfg, pad_id: PairsReadByCharacter(
        str(pairs_teacher), cfg.model.teacher
    )
    if not given_the_tokens:
        TokenBridge._merges = lambda self, before, text: False
    try:
        yield
    finally:
        workers.teacher.make_teacher_engine, TokenBridge._merges = make, merges
