"""One TRL GKDTrainer run for bench_vs_trl.py, inside TRL's own virtualenv (it does not import gkd_async).

    python trl_gkd_run.py STUDENT_DIR TEACHER_DIR ROWS_JSON STEPS BATCH MAX_NEW_TOKENS LR

ROWS_JSON: a list of {"prompt", "answer"}.

Fully on-policy (lmbda = 1), generalized JSD at beta 0.5 on the full vocabulary, sampling at temperature
1; prompts are tokenized as gkd-async tokenizes them (raw text, no chat template). Prints one JSON line:
each optimiser step's end time and the loss, relative to the process start.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402


class PromptCollator:
    """Left-padded prompts, and prompt + answer with the answer as labels, as TRL's ChatML collator builds
    them: lmbda = 1 replaces input_ids and labels with the student's generations on every step, but the
    Trainer counts the dataset's label tokens first (all -100 would make that count 0 and the loss NaN)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        prompts = [self.tokenizer(row["prompt"])["input_ids"] for row in rows]
        answers = [self.tokenizer(row["answer"])["input_ids"] for row in rows]
        width = max(len(p) for p in prompts)
        full_width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))

        def left(seqs: list[list[int]], size: int, fill: int) -> torch.Tensor:
            return torch.tensor([[fill] * (size - len(s)) + s for s in seqs])

        full = [p + a for p, a in zip(prompts, answers, strict=True)]
        labels = [[-100] * len(p) + a for p, a in zip(prompts, answers, strict=True)]
        return {
            "prompts": left(prompts, width, pad),
            "prompt_attention_mask": left([[1] * len(p) for p in prompts], width, 0),
            "input_ids": left(full, full_width, pad),
            "attention_mask": left([[1] * len(f) for f in full], full_width, 0),
            "labels": left(labels, full_width, -100),
        }


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter() - START)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    student, teacher, prompts_file, steps, batch, new_tokens, lr = sys.argv[1:8]
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.padding_side = "left"
    with open(prompts_file) as f:
        prompts = json.load(f)
    args = GKDConfig(
        output_dir=f"/tmp/trl-gkd-bench-{int(START)}",
        max_steps=int(steps),
        per_device_train_batch_size=int(batch),
        gradient_accumulation_steps=1,
        learning_rate=float(lr),
        lr_scheduler_type="constant",
        lmbda=1.0,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=int(new_tokens),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    clock = StepClock()
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(prompts),
        data_collator=PromptCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    print(json.dumps({"step_ends": clock.ends, "losses": clock.losses, "wall_s": time.perf_counter() - START}))


if __name__ == "__main__":
    main()
