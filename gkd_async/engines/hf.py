"""HF transformers engines: sampling for the rollout workers, top-k scoring for the teacher.

Alignment, used everywhere: for a sequence prompt + response with P prompt tokens, the logits at position
P + t - 1 are the distribution of response token t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gkd_async.models import load_model


@dataclass
class Sample:
    """One sampled response and the behaviour log-prob of each of its tokens.

    The behaviour log-prob is the token's log-prob under the distribution it was drawn from:
    softmax(logits / temperature), renormalised over the top-p nucleus when top_p < 1. At top_p = 1
    that is exactly the log_softmax(z / T) the learner's PPO ratio is computed against.
    """

    response_ids: np.ndarray  # int32 [R]
    logprobs: np.ndarray  # float32 [R]


def right_pad(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, L] id tensor padded on the right, and its attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return ids, mask


class HFRolloutEngine:
    """Samples n responses per prompt from the current student weights, one prompt group per call."""

    max_groups_per_call: int | None = 1

    def __init__(self, model_spec: str, dtype: str, pad_id: int, eos_id: int, device: str = "cpu") -> None:
        self.model = load_model(model_spec, dtype).to(device).eval()
        self.pad_id, self.eos_id, self.device = pad_id, eos_id, device
        self.version = 0

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Checked whole before any tensor is copied, so weights that do not fit leave the model as it was."""
        expected = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        given = {name: tuple(t.shape) for name, t in state_dict.items()}
        if given != expected:
            wrong = sorted(set(given) ^ set(expected)) + sorted(
                n for n in given.keys() & expected.keys() if given[n] != expected[n]
            )
            raise ValueError(f"weights do not fit the model: names or shapes differ at {wrong[:5]}")
        if not all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point()):
            raise ValueError("weights hold NaN or infinite values")
        self.model.load_state_dict(state_dict, strict=True)
        self.version = version

    def generate_groups(
        self,
        prompts: Sequence[np.ndarray],
        seeds: Sequence[int],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[list[Sample]]:
        return [self.generate(p, n, temperature, top_p, max_new_tokens, s) for p, s in zip(prompts, seeds, strict=True)]

    @torch.no_grad()
    def generate(
        self, prompt_ids: np.ndarray, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[Sample]:
        prompt = torch.from_numpy(np.array(prompt_ids, dtype=np.int64)).to(self.device).unsqueeze(0).expand(n, -1)
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            torch.manual_seed(seed)
            out = self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
            )
        tokens = out.sequences[:, prompt.shape[1] :]
        scores = torch.stack(out.scores, dim=1).float()  # [n, steps, V]: logits / T, -inf outside the nucleus
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row in range(n):
            length = tokens.shape[1]
            eos = (tokens[row] == self.eos_id).nonzero()
            if len(eos):
                length = int(eos[0]) + 1
            samples.append(
                Sample(
                    tokens[row, :length].cpu().numpy().astype(np.int32),
                    logprobs[row, :length].cpu().numpy().astype(np.float32),
                )
            )
        return samples


class HFTeacherEngine:
    """Runs the teacher over prompt + response and returns its top-k log-probs for the response rows."""

    def __init__(self, model_spec: str, dtype: str, pad_id: int, device: str = "cpu") -> None:
        self.model = load_model(model_spec, dtype).to(device).eval()
        self.pad_id, self.device = pad_id, device
        self.vocab_size = int(self.model.config.vocab_size)

    @torch.no_grad()
    def score(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        k: int,
        temperature: float,
        batch_size: int,
        vocab_limit: int | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (prompt ids, response ids): top-k ids int32 [R, k] and log-probs float32 [R, k].

        `vocab_limit`: score over the first ids only (a teacher whose output layer is padded past the
        student's vocabulary, as Qwen2.5 models of different sizes are: the padded rows are no tokens).
        """
        results: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            ids, mask = right_pad([np.concatenate([p, r]) for p, r in batch], self.pad_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, (prompt, response) in enumerate(batch):
                first = len(prompt) - 1
                rows = logits[row, first : first + len(response), :vocab_limit].float()
                top = torch.log_softmax(rows / temperature, dim=-1).topk(k, dim=-1)
                results.append(
                    (top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy().astype(np.float32))
                )
        return results
