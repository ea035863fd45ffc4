"""How close the cross-tokenizer mapping's rows are to the teacher's exact next-token distribution over the
student's tokens, on the student's own samples: the pairs-of-digits student of `quality_experiment.py
--experiment cross-tokenizer` (tiny:student-pairs, warm-started) and the demo's character-level teacher.

    .venv/bin/python benchmarks/cross_tokenizer_rows.py [--prompts 40] [--student DIR] [--branches 0 4]
        [--pairs-read-by-character]

With `--pairs-read-by-character` the teacher is `tiny:teacher-pairs` read a character at a time
(`character_view.py`) and the exact distribution that teacher's own row over the student's tokens: what the
mapping must give back.

For each held-out prompt the student samples a response (temperature 1); each of its positions gets the mapped row
(teacher top-64, `teacher.cross_tokenizer_branches` as given) and the exact distribution by brute force: the
teacher's full row after the text so far, and for each digit its full row after that digit too (a student token is
a pair of digits, or one digit when no digit follows, or another character). It prints, per setting, how many rows
miss more than 0.05 of the probability of the exact distribution's most likely token, the mean mass missed,
and the total variation distance between the mapped and the exact rows (mean and largest).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from character_view import PairsReadByCharacter  # noqa: E402
from quality_experiment import PAIRS_TEACHER_STEPS  # noqa: E402

from gkd_async.engines.base import TeacherEngine  # noqa: E402
from gkd_async.engines.cross_tokenizer import PROMPT_FIELD, Branches, TokenBridge, prompt_source  # noqa: E402
from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine  # noqa: E402
from gkd_async.models.loading import load_tokenizer, model_vocab_size  # noqa: E402
from workers.commands.demo import DemoSettings, build_task, cached_sft_model, student_warm_start  # noqa: E402

K = 64  # gkd.teacher_topk of the quality experiment


def last_row(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """log-probs of the token after `ids`, from one unpadded forward pass (float64)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def exact_row(teacher, student_tok, teacher_tok, context: np.ndarray, before: str) -> dict[int, float]:
    """The teacher's probability of each next student token after `context`: a digit followed by a digit is a
    pair, a digit followed by anything else (or the end) the digit alone, any other character itself; given the
    student's tokens so far, so after a single digit (`before`) no digit follows (it would have made a pair)."""
    row, out, cut = last_row(teacher, context), {}, 0.0
    for t, lp in enumerate(row.tolist()):
        p = float(np.exp(lp))
        if len(before) == 1 and before.isdigit() and teacher_tok.decode([t]).isdigit():
            cut += p
            continue
        if t == teacher_tok.eos_token_id:
            out[student_tok.eos_token_id] = out.get(student_tok.eos_token_id, 0.0) + p
            continue
        if t in teacher_tok.all_special_ids:
            continue
        char = teacher_tok.decode([t])
        if not char.isdigit():
            token = student_tok.convert_tokens_to_ids(char)
            out[token] = out.get(token, 0.0) + p
            continue
        for u, lq in enumerate(last_row(teacher, np.append(context, t)).tolist()):
            after = teacher_tok.decode([u]) if u not in teacher_tok.all_special_ids else ""
            token = student_tok.convert_tokens_to_ids(char + after if after.isdigit() else char)
            out[token] = out.get(token, 0.0) + p * float(np.exp(lq))
    return {token: p / (1.0 - cut) for token, p in out.items()}


def brute_force_rows(teacher, student_tok, teacher_tok, teacher_prompt: np.ndarray, response: np.ndarray) -> list:
    """`exact_row` at each response position: after the text of the student's tokens before it."""
    exact, text, before = [], "", ""
    for token in response.tolist():
        context = np.concatenate([teacher_prompt, teacher_tok(text, add_special_tokens=False)["input_ids"]])
        exact.append(exact_row(teacher, student_tok, teacher_tok, context.astype(np.int64), before))
        before = student_tok.decode([token]) if token != student_tok.eos_token_id else ""
        text += before
    return exact


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/cross-tokenizer-rows"))
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--student", help="a student to sample from (default: the warm-started one)")
    parser.add_argument("--branches", type=int, nargs="*", default=[0, 4])
    parser.add_argument(
        "--pairs-read-by-character",
        action="store_true",
        help="the teacher: tiny:teacher-pairs read a character at a time (character_view.py); the exact rows: "
        "that teacher's own rows over the student's tokens",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = DemoSettings(student="tiny:student-pairs")
    train, heldout = build_task(args.out, settings)
    teacher_dir = cached_sft_model("teacher", "tiny:teacher", train, settings.teacher_steps, settings, print)
    student_dir = args.student or str(student_warm_start(train, settings, print))
    student_tok, teacher_tok = load_tokenizer(student_dir), load_tokenizer(str(teacher_dir))
    bridge = TokenBridge(student_tok, teacher_tok, model_vocab_size(str(teacher_dir)))
    engine: TeacherEngine = HFTeacherEngine(str(teacher_dir), "float32", teacher_tok.pad_token_id)
    pairs = None  # the same-tokenizer teacher, whose own rows are then the exact ones
    if args.pairs_read_by_character:
        pairs_dir = cached_sft_model("teacher", "tiny:teacher-pairs", train, PAIRS_TEACHER_STEPS, settings, print)
        pairs = HFTeacherEngine(str(pairs_dir), "float32", student_tok.pad_token_id)
        engine = PairsReadByCharacter(str(pairs_dir), str(teacher_dir))
    rollout = HFRolloutEngine(student_dir, "float32", student_tok.pad_token_id, student_tok.eos_token_id)
    missed: dict[int, list[float]] = {width: [] for width in args.branches}
    apart: dict[int, list[float]] = {width: [] for width in args.branches}
    rows = [json.loads(line) for line in heldout.read_text().splitlines()][: args.prompts]
    for seed, row in enumerate(rows):
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = np.asarray(
            student_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False),
            np.int32,
        )
        [[sample]] = rollout.generate_groups([prompt], [seed], 1, 1.0, 1.0, settings.digits + 2)
        response = sample.response_ids
        teacher_prompt = bridge.teacher_prompt(prompt, {PROMPT_FIELD: prompt_source(row["prompt"], None)})
        teacher_response, anchors = bridge.teacher_response(response)
        [(ids, lps, own)] = engine.score([(teacher_prompt, teacher_response)], K, 1.0, 1, sampled=True)
        if pairs is not None:  # the same-tokenizer teacher's own rows, its whole vocabulary
            [(pair_ids, pair_lps)] = pairs.score([(prompt, response)], pairs.vocab_size, 1.0, 1)
            exact = [
                dict(zip(i.tolist(), np.exp(lp).tolist(), strict=True))
                for i, lp in zip(pair_ids, pair_lps, strict=True)
            ]
        else:
            exact = brute_force_rows(engine.model, student_tok, teacher_tok, teacher_prompt, response)
        for width in args.branches:
            branches = Branches()
            if width:
                wanted = bridge.branch_requests(ids, lps, anchors, teacher_response, own, width)
                after = engine.score_branches([(teacher_prompt, teacher_response)], [wanted], K, 1.0, 1)
                branches = Branches.scored(wanted, *after[0])
            mapped_ids, mapped = bridge.student_rows(ids, lps, anchors, K, teacher_response, own, branches)
            for i, want in enumerate(exact):
                got = dict(zip(mapped_ids[i].tolist(), np.exp(mapped[i]).tolist(), strict=True))
                best = max(want, key=want.get)
                missed[width].append(want[best] - got.get(best, 0.0))
                # total variation over the student's tokens: mass the row puts elsewhere or leaves in its tail
                apart[width].append(0.5 * sum(abs(want.get(t, 0.0) - got.get(t, 0.0)) for t in {*want, *got}))
    print(
        "\n| teacher.cross_tokenizer_branches | rows | rows missing > 0.05 of the exact top token | mean missed"
        " | total variation: mean | max |"
    )
    print("|---|---|---|---|---|---|")
    for width, values in missed.items():
        a, tv = np.asarray(values), np.asarray(apart[width])
        print(f"| {width} | {len(a)} | {(a > 0.05).sum()} | {a.mean():.4f} | {tv.mean():.4f} | {tv.max():.4f} |")


if __name__ == "__main__":
    main()
