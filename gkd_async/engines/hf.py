"""HF transformers engines: sampling for the rollout workers, top-k scoring for the teacher.

Alignment, used everywhere: for a sequence prompt + response with P prompt tokens, the logits at position
P + t - 1 are the distribution of response token t.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gkd_async.engines.base import RolloutEngine, Sample, TeacherEngine, sample_seed
from gkd_async.loss.fused_head import head_bypassed, head_chunk_rows, supports_fused_head
from gkd_async.loss.topk import CHUNK_ELEMENTS
from gkd_async.models.hidden_signal import check_plain_head, hidden_to_wire
from gkd_async.models.loading import all_finite, load_model, retie, tied_aliases, with_tied


def right_pad(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, L] id tensor padded on the right, and its attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return ids, mask


def left_pad(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, L] id tensor padded on the left (every row's last token in the last column), and its mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
            mask[row, width - len(seq) :] = 1
    return ids, mask


def nucleus_logprobs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Each row renormalised over its smallest top-p nucleus (the tokens whose mass before them, in
    descending order, is below top_p), -inf elsewhere."""
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    mass_before = probs.cumsum(-1) - probs
    sorted_lp = sorted_lp.masked_fill(mass_before >= top_p, float("-inf"))
    kept = torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)
    return torch.log_softmax(kept, dim=-1)


def inverse_cdf_sample(logprobs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of `logprobs` [rows, V], drawn with one uniform number from the row's own generator.
    A token of probability 0 (outside the nucleus) is never drawn: the cumulative sum does not rise there."""
    cdf = logprobs.exp().double().cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators])
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return chosen.clamp(max=logprobs.shape[-1] - 1)


class HFRolloutEngine(RolloutEngine):
    """Samples n responses per prompt for many prompt groups in one batched decode with a KV cache.

    Prompts are left-padded; every sample has its own generator (seeded by `sample_seed`) and draws one
    uniform number per step, the token being where it falls in the step's cumulative distribution (inverse
    CDF, in float64), so what a sample gets depends on its group's seed alone, not on the other groups in
    the call. (An exponential race, one draw per vocabulary entry, cost 0.68 s of draws per 8 x 32 tokens at
    a 151,936-token vocabulary against 0.17 s.) `max_batch_tokens` bounds rows x (prompt + new tokens) per
    call.
    """

    def __init__(
        self,
        model_spec: str,
        dtype: str,
        pad_id: int,
        eos_id: int,
        device: str = "cpu",
        max_batch_tokens: int = 65536,
        trust_remote_code: bool = False,
    ) -> None:
        self.model = load_model(model_spec, dtype, trust_remote_code).to(device).eval()
        self.tied = tied_aliases(self.model)  # read once: adopting weights gives each name a parameter of its own
        self.pad_id, self.eos_id, self.device = pad_id, eos_id, device
        self.max_batch_tokens = max_batch_tokens
        self.version = 0

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Checked whole before any tensor is taken, so weights that do not fit leave the model as it was.
        A tied weight comes once, under its first name (as published), and is tied back here."""
        current = self.model.state_dict()
        state_dict = {  # in the model's dtype and on its device; the given tensor itself where it already is
            name: t.to(device=current[name].device, dtype=current[name].dtype) if name in current else t
            for name, t in state_dict.items()
        }
        state_dict = with_tied(state_dict, self.tied)
        expected = {name: tuple(t.shape) for name, t in current.items()}
        given = {name: tuple(t.shape) for name, t in state_dict.items()}
        if given != expected:
            wrong = sorted(set(given) ^ set(expected)) + sorted(
                n for n in given.keys() & expected.keys() if given[n] != expected[n]
            )
            raise ValueError(f"weights do not fit the model: names or shapes differ at {wrong[:5]}")
        if not all(all_finite(t) for t in state_dict.values() if t.is_floating_point()):
            raise ValueError("weights hold NaN or infinite values")
        # Adopted, not copied: the transports hand over tensors nobody changes afterwards (a version read from
        # Redis or a file is this reader's own; in_process shares the learner's gathered copy between workers).
        del current
        self.model.load_state_dict(state_dict, strict=True, assign=True)
        retie(self.model, self.tied)
        self.version = version

    def groups_per_call(self, prompt_lengths: Sequence[int], n: int, max_new_tokens: int) -> int:
        """The longest prefix of groups whose padded rows fit `max_batch_tokens` (at least one group)."""
        width = 0
        for count, length in enumerate(prompt_lengths, start=1):
            width = max(width, length)
            if count > 1 and count * n * (width + max_new_tokens) > self.max_batch_tokens:
                return count - 1
        return len(prompt_lengths)

    @torch.no_grad()
    def generate_groups(
        self,
        prompts: Sequence[np.ndarray],
        seeds: Sequence[int],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        topk: int = 0,
    ) -> list[list[Sample]]:
        rows = [prompt for prompt in prompts for _ in range(n)]
        generators = [
            torch.Generator(device=self.device).manual_seed(sample_seed(seed, index))
            for seed in seeds
            for index in range(n)
        ]
        ids, mask = left_pad(rows, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits are sampled from: never hold [rows, prompt, vocabulary].
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        tokens = torch.full((len(rows), max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((len(rows), max_new_tokens), dtype=torch.float32, device=self.device)
        lengths = torch.full((len(rows),), max_new_tokens, dtype=torch.long, device=self.device)
        running = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        top = torch.zeros((len(rows), max_new_tokens, topk), dtype=torch.long, device=self.device)
        for t in range(max_new_tokens):
            if topk:  # the order of the logits is that of the tempered distribution's
                top[:, t] = out.logits[:, -1].topk(topk, dim=-1).indices
            step_lp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
            if top_p < 1.0:
                step_lp = nucleus_logprobs(step_lp, top_p)
            chosen = inverse_cdf_sample(step_lp, generators)
            chosen = torch.where(running, chosen, self.pad_id)
            tokens[:, t] = chosen
            logprobs[:, t] = step_lp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            ended = running & (chosen == self.eos_id)
            lengths = torch.where(ended, t + 1, lengths)
            running &= ~ended
            if t + 1 == max_new_tokens or not bool(running.any()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=chosen.unsqueeze(-1),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        tokens_np, logprobs_np, lengths_np = tokens.cpu().numpy(), logprobs.cpu().numpy(), lengths.cpu().tolist()
        top_np = top.cpu().numpy().astype(np.int32) if topk else None
        samples = [
            Sample(
                tokens_np[row, :length].astype(np.int32),
                logprobs_np[row, :length].astype(np.float32),
                None if top_np is None else top_np[row, :length],
            )
            for row, length in enumerate(lengths_np)
        ]
        return [samples[i : i + n] for i in range(0, len(samples), n)]


class HFTeacherEngine(TeacherEngine):
    """Runs the teacher over prompt + response and returns its top-k log-probs for the response rows."""

    def __init__(
        self,
        model_spec: str,
        dtype: str,
        pad_id: int,
        device: str = "cpu",
        trust_remote_code: bool = False,
        share_prompts: bool = False,
    ) -> None:
        """`share_prompts` (teacher.share_prompts): the samples of one prompt are scored against one prefill of
        it (see `_score_shared`)."""
        self.model = load_model(model_spec, dtype, trust_remote_code).to(device).eval()
        self.pad_id, self.device, self.share_prompts = pad_id, device, share_prompts
        self.vocab_size = int(self.model.config.vocab_size)
        # Logits of response rows only, a few rows at a time (as the learner's fused head): [batch, prompt +
        # response, V] at a real vocabulary is hundreds of MB (8 x 96 x 151,936 fp32: 467 MB) for a top-k.
        self.head = self.model.get_output_embeddings() if supports_fused_head(self.model) else None
        if self.head is not None:
            self.chunk_rows = head_chunk_rows(self.head.weight.shape)
        else:  # the logits are there already: chunks bound only the log-softmax's copy
            self.chunk_rows = max(1, CHUNK_ELEMENTS // self.vocab_size)

    @torch.no_grad()
    def score(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        k: int,
        temperature: float,
        batch_size: int,
        vocab_limit: int | None = None,
        sampled: bool = False,
        extra_ids: Sequence[np.ndarray] | None = None,
        hidden_dtype: str | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """For each (prompt ids, response ids): top-k ids int32 [R, k] and log-probs float32 [R, k], and
        with `sampled` each response token's own log-prob [R]; with `extra_ids`, the log-probs at those ids
        after the top-k (TeacherEngine.score); with `hidden_dtype` (gkd.teacher_signal=hidden), last the hidden
        states the output layer turns into those rows' logits, [R, H] as `hidden_signal.hidden_to_wire` makes them.

        `vocab_limit`: score over the first ids only (a teacher whose output layer is padded past the
        student's vocabulary, as Qwen2.5 models of different sizes are: the padded rows are no tokens).
        """
        extras = [None] * len(pairs) if extra_ids is None else list(extra_ids)
        if hidden_dtype is not None and self.head is None:
            check_plain_head(self.model.config, "teacher")  # names the transform after the output layer
            raise ValueError("gkd.teacher_signal=hidden needs a teacher with a linear output layer")
        if self.share_prompts:
            return self._score_shared(pairs, k, temperature, batch_size, vocab_limit, sampled, extras, hidden_dtype)
        results: list[tuple[np.ndarray, ...]] = []
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            ids, mask = right_pad([np.concatenate([p, r]) for p, r in batch], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            if self.head is None:
                outputs = self.model(input_ids=ids, attention_mask=mask).logits
            else:  # last hidden states: the head runs on response rows only, below
                with head_bypassed(self.model):
                    outputs = self.model(input_ids=ids, attention_mask=mask).logits
            for row, (prompt, response) in enumerate(batch):
                first, extra = len(prompt) - 1, extras[start + row]
                parts = [
                    self._top(outputs[row, first + rows.start : first + rows.stop], response[rows], k, temperature,
                              vocab_limit, sampled, None if extra is None else extra[rows], hidden_dtype)
                    for rows in _row_chunks(len(response), self.chunk_rows)
                ]  # fmt: skip
                results.append(tuple(np.concatenate(column) for column in zip(*parts, strict=True)))
        return results

    @torch.no_grad()
    def score_branches(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        branches: Sequence[Sequence[tuple[int, int]]],
        k: int,
        temperature: float,
        batch_size: int,
        vocab_limit: int | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`TeacherEngine.score_branches` by tree attention: each sample's context (its prompt, its response up to
        its last branch row) runs once, its branch tokens after it, each at the position of the response token
        it stands in for and attending to the context before that position and to itself only (a 4D mask)."""
        empty = (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
        results: list[tuple[np.ndarray, np.ndarray]] = [empty] * len(pairs)
        todo = [i for i, wanted in enumerate(branches) if wanted]
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            contexts = [np.concatenate([pairs[i][0], pairs[i][1][: max(row for row, _ in branches[i])]]) for i in part]
            width = max(len(c) + len(branches[i]) for c, i in zip(contexts, part, strict=True))
            ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            positions = torch.zeros((len(part), width), dtype=torch.long)
            allowed = torch.eye(width, dtype=torch.bool).repeat(len(part), 1, 1)  # padding sees itself only
            for b, (i, context) in enumerate(zip(part, contexts, strict=True)):
                n, prompt_length = len(context), len(pairs[i][0])
                rows, tokens = zip(*branches[i], strict=True)
                ids[b, : n + len(tokens)] = torch.as_tensor(np.concatenate([context, tokens]).astype(np.int64))
                positions[b, :n] = torch.arange(n)
                positions[b, n : n + len(tokens)] = prompt_length + torch.as_tensor(rows)
                allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
                for j, row in enumerate(rows):
                    allowed[b, n + j, : prompt_length + row] = True
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            with head_bypassed(self.model) if self.head is not None else contextlib.nullcontext():
                outputs = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask[:, None].to(self.device),
                    position_ids=positions.to(self.device),
                ).logits
            for b, (i, context) in enumerate(zip(part, contexts, strict=True)):
                rows_out = outputs[b, len(context) : len(context) + len(branches[i])]
                chunks = [
                    self._top(rows_out[r], np.zeros(0, np.int64), k, temperature, vocab_limit, sampled=False)
                    for r in _row_chunks(len(rows_out), self.chunk_rows)
                ]
                results[i] = tuple(np.concatenate(column) for column in zip(*chunks, strict=True))
        return results

    def _score_shared(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        k: int,
        temperature: float,
        batch_size: int,
        vocab_limit: int | None,
        sampled: bool,
        extras: list[np.ndarray | None],
        hidden_dtype: str | None,
    ) -> list[tuple[np.ndarray, ...]]:
        """`score` with each distinct prompt prefilled once: its KV cache is repeated over the responses that
        follow it (a group's n samples), up to `batch_size` of them a forward, so a prompt of P tokens costs P
        once instead of n times. The row of response token 0 is the prompt's last position, shared too."""
        by_prompt: dict[bytes, list[int]] = {}
        for index, (prompt, _) in enumerate(pairs):
            by_prompt.setdefault(np.asarray(prompt, np.int64).tobytes(), []).append(index)
        results: list[tuple[np.ndarray, ...] | None] = [None] * len(pairs)
        for indices in by_prompt.values():
            prompt = torch.as_tensor(np.asarray(pairs[indices[0]][0], np.int64), device=self.device)[None]
            with head_bypassed(self.model) if self.head is not None else contextlib.nullcontext():
                prefix = self.model(input_ids=prompt, use_cache=True)
            first_row = prefix.logits[:, -1]  # [1, H] (or [1, V] without a bypassed head)
            for start in range(0, len(indices), batch_size):
                part = indices[start : start + batch_size]
                responses = [np.asarray(pairs[i][1]) for i in part]
                rows = self._response_rows(prefix.past_key_values, prompt.shape[1], responses)
                for j, i in enumerate(part):
                    later = 0 if rows is None else max(len(responses[j]) - 1, 0)
                    outputs = torch.cat([first_row, rows[j, :later]]) if later else first_row
                    extra = extras[i]
                    chunks = [
                        self._top(
                            outputs[r], responses[j][r], k, temperature, vocab_limit, sampled,
                            None if extra is None else extra[r], hidden_dtype,
                        )
                        for r in _row_chunks(len(responses[j]), self.chunk_rows)
                    ]  # fmt: skip
                    results[i] = tuple(np.concatenate(column) for column in zip(*chunks, strict=True))
        return results

    def _response_rows(self, past, prompt_length: int, responses: list[np.ndarray]) -> torch.Tensor | None:
        """Outputs at every response position but the last, [n, R - 1, ...], for `responses` after the prompt
        whose cache is `past` (a copy of it repeated over the n responses: the prompt's own stays for the next);
        None when no response has a second token."""
        if max(len(r) for r in responses) < 2:
            return None
        cache = copy.deepcopy(past)
        cache.batch_repeat_interleave(len(responses))
        ids, mask = right_pad([r[:-1] for r in responses], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        length = ids.shape[1]
        attention = torch.cat(
            [torch.ones(len(responses), prompt_length, dtype=mask.dtype, device=self.device), mask], 1
        )
        positions = torch.arange(prompt_length, prompt_length + length, device=self.device)
        with head_bypassed(self.model) if self.head is not None else contextlib.nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=attention,
                past_key_values=cache,
                position_ids=positions[None].expand(len(responses), -1),
                cache_position=positions,
                use_cache=True,
            )
        return out.logits

    def _top(
        self,
        outputs: torch.Tensor,
        response: np.ndarray,
        k: int,
        temperature: float,
        vocab_limit: int | None,
        sampled: bool,
        extra: np.ndarray | None = None,
        hidden_dtype: str | None = None,
    ) -> tuple[np.ndarray, ...]:
        """Top-k (and the sampled token's log-prob) of a few response rows, from their logits or, where the
        head was bypassed, their hidden states; with `extra` [rows, k_s], the log-probs at those ids too; with
        `hidden_dtype`, the hidden states themselves."""
        logits = outputs if self.head is None else self.head(outputs)
        logprobs = torch.log_softmax(logits[:, :vocab_limit].float() / temperature, dim=-1)
        top = logprobs.topk(k, dim=-1)
        ids, values = top.indices, top.values
        if extra is not None:
            more = torch.as_tensor(extra.astype(np.int64), device=logprobs.device)
            taken = (more[:, :, None] == ids[:, None, :]).any(-1)  # already a category among the top-k
            ids = torch.cat([ids, more], dim=-1)
            values = torch.cat([values, logprobs.gather(1, more).masked_fill(taken, float("-inf"))], dim=-1)
        scores = (ids.cpu().numpy().astype(np.int32), values.cpu().numpy().astype(np.float32))
        if sampled:
            tokens = torch.as_tensor(response.astype(np.int64), device=logprobs.device)[:, None]
            scores += (logprobs.gather(1, tokens)[:, 0].cpu().numpy().astype(np.float32),)
        if hidden_dtype is not None:
            scores += (hidden_to_wire(outputs, hidden_dtype),)
        return scores


def _row_chunks(rows: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` rows covering `rows` (one empty slice for none)."""
    return [slice(start, min(start + size, rows)) for start in range(0, max(rows, 1), size)]
