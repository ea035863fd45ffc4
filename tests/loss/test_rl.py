"""RL + distillation: GRPO advantages, the PPO-clip loss, reward functions, and both coefficients."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd_async.config.loading import load_config
from gkd_async.engines.hf import HFRolloutEngine
from gkd_async.loss.policy import grpo_advantages, policy_loss
from gkd_async.models.loading import load_model, load_tokenizer
from gkd_async.preflight.checks import preflight
from gkd_async.rewards.functions import exact_match
from gkd_async.rewards.loading import RewardError, compute_reward, load_reward_function
from gkd_async.rewards.pool import RewardPool
from gkd_async.train.batching import TrainSample, collate


def test_grpo_advantages_by_hand():
    np.testing.assert_allclose(grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0])), [1, -1, -1, 1], atol=1e-5)
    rewards = np.array([3.0, 1.0, 2.0])
    mean, std = 2.0, np.sqrt(2.0 / 3.0)
    np.testing.assert_allclose(grpo_advantages(rewards), (rewards - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(grpo_advantages(np.array([0.5, 0.5, 0.5])), [0, 0, 0])


def fresh_batch(temperature):
    tok = load_tokenizer("tiny:student")
    engine = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id)
    samples = []
    for g, text in enumerate(["1+2=", "40+5="]):
        prompt = np.asarray(tok(text)["input_ids"], dtype=np.int32)
        outs = engine.generate(prompt, 3, temperature, 1.0, 6, seed=g)
        advantages = grpo_advantages(np.arange(3, dtype=np.float32))
        samples += [
            TrainSample(
                f"{g}/{i}",
                str(g),
                0,
                prompt,
                o.response_ids,
                np.zeros((len(o.response_ids), 1), np.int32),
                np.zeros((len(o.response_ids), 1), np.float32),
                o.logprobs,
                advantage=float(a),
            )
            for i, (o, a) in enumerate(zip(outs, advantages, strict=True))
        ]
    return collate(samples, tok.pad_token_id, 1), load_model("tiny:student")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ppo_ratio_is_one_on_fresh_samples_and_the_gradient_is_reinforce(temperature):
    mb, model = fresh_batch(temperature)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
    total, stats = policy_loss(
        logits, mb.targets, mb.behaviour_logprobs, mb.advantages, mb.response_mask, temperature, 0.2
    )
    tokens = int(mb.response_mask.sum())
    assert stats["ratio"].item() / tokens == pytest.approx(1.0, abs=1e-5)
    assert stats["clipped"].item() == 0
    assert total.item() == pytest.approx(-mb.advantages[mb.response_mask].sum().item(), abs=1e-3)
    (grad,) = torch.autograd.grad(total, logits)
    z = logits.detach().clone().requires_grad_(True)
    ref = -(mb.advantages * torch.log_softmax(z / temperature, -1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1))
    (expected,) = torch.autograd.grad(ref[mb.response_mask].sum(), z)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_clipping_stops_the_gradient_of_tokens_pushed_too_far():
    logits = torch.randn(1, 3, 7, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3]])
    logp = torch.log_softmax(logits.detach(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # ratios of 2.0 (positive advantage: clipped), 1.0 and 0.5 (negative advantage: clipped)
    behaviour = logp - torch.log(torch.tensor([[2.0, 1.0, 0.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    total, stats = policy_loss(logits, tokens, behaviour, advantages, mask, 1.0, 0.2)
    (grad,) = torch.autograd.grad(total, logits)
    assert stats["clipped"].item() == 2
    assert torch.all(grad[0, 0] == 0) and torch.all(grad[0, 2] == 0) and grad[0, 1].abs().sum() > 0
    assert total.item() == pytest.approx(-(1.2 * 1.0 + 1.0 * 1.0 + 0.8 * -1.0), abs=1e-5)


def write(tmp_path, text):
    path = tmp_path / "reward.py"
    path.write_text(text)
    return str(path)


def test_reward_function_loading_and_clear_errors(tmp_path):
    fn = load_reward_function(
        write(
            tmp_path, "def score(prompt, response, answer=None, **kw):\n    return len(response) + (answer == 'x')\n"
        ),
        "score",
    )
    assert compute_reward(fn, "p", "abc", {"answer": "x"}) == 4.0
    with pytest.raises(RewardError, match="does not exist"):
        load_reward_function(str(tmp_path / "none.py"), "score")
    with pytest.raises(RewardError, match="nope is not defined in .*functions there: score"):
        load_reward_function(write(tmp_path, "def score(p, r, **k):\n    return 1.0\n"), "nope")
    with pytest.raises(RewardError, match="importing .* failed: SyntaxError"):
        load_reward_function(write(tmp_path, "def score(:\n"), "score")
    bad = load_reward_function(write(tmp_path, "def score(p, r, **k):\n    return 'high'\n"), "score")
    with pytest.raises(RewardError, match="returned 'high' \\(str\\); it must return a number"):
        compute_reward(bad, "p", "r", {})
    raising = load_reward_function(write(tmp_path, "def score(p, r, **k):\n    raise KeyError('answer')\n"), "score")
    with pytest.raises(RewardError, match="raised KeyError"):
        compute_reward(raising, "p", "r", {})
    nan = load_reward_function(write(tmp_path, "def score(p, r, **k):\n    return float('nan')\n"), "score")
    with pytest.raises(RewardError, match="finite"):
        compute_reward(nan, "p", "r", {})


REWARD_MODULE = """
import os, time
def score(prompt, response, answer=None, **extra):
    print("a reward's own output")  # must not reach the pool's replies
    if response == "hang":
        time.sleep(600)
    if response == "exit":
        os._exit(3)
    if response == "raise":
        raise KeyError(answer)
    if response == "pid":
        time.sleep(0.3)
        return float(os.getpid())
    return len(response) + (answer == extra["nested"]["answer"])
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the pool waits for what it kills: no zombie stays
    except ProcessLookupError:
        return False
    return True


def test_the_reward_pool_kills_a_hung_call_and_survives_a_dead_process(tmp_path):
    path = write(tmp_path, REWARD_MODULE)
    extra = {"answer": "x", "nested": {"answer": "x"}}
    reference = load_reward_function(path, "score")
    beats = []
    pool = RewardPool(path, "score", 2, 1.5, lambda: beats.append(time.monotonic()))
    try:
        np.testing.assert_array_equal(
            pool.score("p", ["abc", "", "abcdef"], extra),
            [compute_reward(reference, "p", r, extra) for r in ("abc", "", "abcdef")],
        )
        pids = pool.score("p", ["pid", "pid"], extra)
        assert len(set(pids.tolist())) == 2  # both processes served the group at once
        start = time.monotonic()
        with pytest.raises(RewardError, match="did not return within 1.5s .*its process was killed"):
            pool.score("p", ["abc", "hang"], extra)
        assert 1.5 <= time.monotonic() - start < 10 and beats  # the heartbeat ran while it waited
        assert sum(alive(int(pid)) for pid in pids) == 1  # the hung one is gone, not left running
        with pytest.raises(RewardError, match="process ended \\(exit code 3\\)"):
            pool.score("p", ["exit"], extra)
        with pytest.raises(RewardError, match="raised KeyError"):
            pool.score("p", ["raise"], extra)
        assert pool.score("p", ["abcd"], extra).tolist() == [5.0]  # new processes took over
    finally:
        pool.close()
    assert not any(alive(int(pid)) for pid in pids)


POOL_OWNER = """
import sys
from gkd_async.rewards.pool import RewardPool
pool = RewardPool(sys.argv[1], "score", 1, 600)
extra = {"answer": "x", "nested": {"answer": "x"}}
print(int(pool.score("p", ["pid"], extra)[0]), flush=True)
pool.score("p", ["hang"], extra)
"""


def test_a_reward_process_ends_when_its_worker_is_killed_mid_call(tmp_path):
    """kill -9 of the worker while its reward hangs: the reward's process does not run on for the call's
    remaining 10 minutes."""
    import psutil

    owner = subprocess.Popen(
        [sys.executable, "-c", POOL_OWNER, write(tmp_path, REWARD_MODULE)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    try:
        child = psutil.Process(int(owner.stdout.readline()))
        time.sleep(0.5)  # the hanging call is under way
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    finally:
        owner.kill()
        owner.wait()
    with contextlib.suppress(psutil.NoSuchProcess):
        child.wait(timeout=10)  # raises TimeoutExpired if it lingers
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_the_reward_pool_reports_a_function_that_does_not_load(tmp_path):
    pool = RewardPool(write(tmp_path, "def score(:\n"), "score", 1, 30)
    try:
        with pytest.raises(RewardError, match="importing .* failed: SyntaxError"):
            pool.score("p", ["r"], {})
    finally:
        pool.close()


def test_a_reward_that_cannot_take_the_datas_fields_is_refused_at_start(tmp_path):
    """The built-in addition rows carry `answer`: a reward without a parameter for it would raise on every call."""

    def config_for(parameters):  # a file of its own each: never a cached compile of an earlier one
        path = tmp_path / f"reward{len(list(tmp_path.iterdir()))}.py"
        path.write_text(f"def r({parameters}):\n    return 1.0\n")
        return load_config(None, [f"custom_reward_function.path={path}", "custom_reward_function.name=r"])

    with pytest.raises(
        RewardError,
        match=r"r\(prompt, response, extra\) cannot be called as r\(prompt, response, \*\*fields\) with the data's "
        r"fields \(answer\): missing a required argument: 'extra'. Give it the parameters \(prompt, response, "
        r"\*\*extra\)",
    ):
        preflight(config_for("prompt, response, extra"))
    with pytest.raises(RewardError, match="got an unexpected keyword argument 'answer'"):
        preflight(config_for("prompt, response, extra=None"))
    with pytest.raises(RewardError, match="missing a required argument: 'level'"):
        preflight(config_for("prompt, response, answer, level"))
    for good in ("prompt, response, **extra", "p, r, answer", "p, r, answer=None, level=1", "*args, **kwargs"):
        preflight(config_for(good))


def test_exact_match():
    assert exact_match("1+2=", " 3 ", answer="3") == 1.0
    assert exact_match("1+2=", "33", answer="3") == 0.0
    assert exact_match("1+2=", "3") == 0.0
