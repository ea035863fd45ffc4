"""Supervised fine-tuning on (prompt, answer) pairs: how the demo makes its teacher and warm-starts its
student. Single process; the loss is on the answer tokens and the end-of-sequence token."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from gkd_async.data.prompt import Prompt


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def sft_train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[Prompt, str]],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    stop_when: Callable[[int], bool] | None = None,
    check_every: int = 25,
) -> tuple[int, float]:
    """Train in place with AdamW; returns the steps taken and the last loss.

    Without `stop_when`: `steps` steps of a one-cycle schedule. With it: a warm-up over a tenth of `steps`
    then a constant rate, and `stop_when(step)` asked every `check_every` steps, training ending at the
    first True (or after `steps`), so the model stops at a measured quality rather than a step count.
    """
    rng = random.Random(seed)
    encoded = [(p.ids.tolist(), answer_ids(tokenizer, answer)) for p, answer in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if stop_when is None:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    else:
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    loss_value = float("nan")
    step = 0
    for step in range(1, steps + 1):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, a) in enumerate(batch):
            seq = p + a
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if on_step is not None:
            on_step(step, loss_value)
        if stop_when is not None and step % check_every == 0:
            model.eval()
            if stop_when(step):
                break
            model.train()
    model.eval()
    return step, loss_value
