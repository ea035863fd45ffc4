"""Greedy evaluation: mean reward of a model's greedy answers to held-out prompts (with an exact-match
reward, that is accuracy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from gkd_async.data.prompt import Prompt
from gkd_async.rewards.loading import RewardFn, compute_reward


@torch.no_grad()
def greedy_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p.ids) for p in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):  # left padding, so every prompt ends where generation starts
            ids[row, width - len(p.ids) :] = torch.from_numpy(p.ids.astype(np.int64))
            mask[row, width - len(p.ids) :] = 1
        generated = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def mean_reward(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    reward_fn: RewardFn,
    max_new_tokens: int,
) -> float:
    responses = greedy_responses(model, tokenizer, prompts, max_new_tokens)
    rewards = [
        compute_reward(reward_fn, tokenizer.decode(p.ids, skip_special_tokens=True), r, p.extra)
        for p, r in zip(prompts, responses, strict=True)
    ]
    return float(np.mean(rewards)) if rewards else 0.0


class Evaluator:
    """Holds an unsharded copy of the student on the learner's rank 0 for periodic evaluation."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Prompt],
        reward_fn: RewardFn,
        max_new_tokens: int,
    ) -> None:
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.reward_fn, self.max_new_tokens = reward_fn, max_new_tokens

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state_dict)
        value = mean_reward(self.model, self.tokenizer, self.prompts, self.reward_fn, self.max_new_tokens)
        return {"val/reward_mean": value}
