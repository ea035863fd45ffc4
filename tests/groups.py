"""Scored groups made up for tests of the learner's step: random ids, log-probs and rewards at top-K."""

import numpy as np

from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine
from gkd_async.loss.policy import grpo_advantages
from gkd_async.models.loading import load_tokenizer
from gkd_async.train.batching import TrainSample

K = 16


def make_groups():
    tok = load_tokenizer("tiny:student")
    rollout = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id)
    teacher = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id)
    groups = []
    for g, text in enumerate(["1+2=", "30+4=", "555+1=", "9+9=", "12+0="]):
        prompt = np.asarray(tok(text)["input_ids"], dtype=np.int32)
        samples = rollout.generate(prompt, 2, 1.0, 1.0, 4 + 2 * g, seed=g)  # lengths differ by group
        scores = teacher.score([(prompt, s.response_ids) for s in samples], K, 1.0, 4, sampled=True)
        advantages = grpo_advantages(np.array([i % 2 for i in range(len(samples))], dtype=np.float32))
        groups.append(
            [
                TrainSample(
                    f"{g}/{i}",
                    str(g),
                    0,
                    prompt,
                    s.response_ids,
                    ids,
                    lps,
                    s.logprobs,
                    advantage=float(a),
                    teacher_token_logprobs=tokens,
                )
                for i, (s, (ids, lps, tokens), a) in enumerate(zip(samples, scores, advantages, strict=True))
            ]
        )
    return groups, tok.pad_token_id
