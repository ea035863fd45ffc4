"""The fused LM-head loss: the same loss, statistics and gradients as the materialised path (itself checked
against numpy), whatever the chunking, and never a [N, V] buffer beyond a chunk."""

import numpy as np
import pytest
import torch
from reference import np_divergence, np_log_softmax

from gkd_async.loss.fused_head import STAT_NAMES, HeadLoss, HeadTargets, fused_head_loss, head_bypassed
from gkd_async.loss.policy import policy_loss
from gkd_async.loss.topk import LOSS_TYPES, distill_loss
from gkd_async.models.loading import load_model, load_tokenizer

N, H, V, K = 13, 6, 17, 5


def make_inputs(seed, dtype=torch.float64, k=K, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, dtype=dtype)
    b = torch.randn(V, generator=gen, dtype=dtype) if bias else None
    teacher = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * 2, -1)
    ids = torch.argsort(teacher, -1, descending=True)[:, :k]
    targets = HeadTargets(
        topk_ids=ids,
        topk_logprobs=teacher.gather(-1, ids).to(dtype),
        tokens=torch.randint(0, V, (N,), generator=gen),
        behaviour_logprobs=-torch.rand(N, generator=gen, dtype=dtype) * 3,
        advantages=torch.randn(N, generator=gen, dtype=dtype),
        weights=torch.rand(N, generator=gen, dtype=dtype),
        opd_advantages=torch.randn(N, generator=gen, dtype=dtype),
    )
    return hidden, weight, b, targets, teacher


def materialised(hidden, weight, bias, t, spec):
    """The reference: full logits, then `distill_loss` and `policy_loss` (for RL and for OPD) as the unfused
    learner calls them."""
    logits = torch.nn.functional.linear(hidden, weight, bias)[None]
    mask = torch.ones(1, hidden.shape[0], dtype=torch.bool)
    weights = None if t.weights is None else t.weights[None]
    total = logits.new_zeros(())
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    if spec.distill_coef:
        d, _, diag = distill_loss(
            logits,
            t.topk_ids[None],
            t.topk_logprobs[None],
            mask,
            spec.loss_type,
            spec.distill_temperature,
            spec.jsd_beta,
            weights=weights,
        )
        total = total + spec.distill_coef * d
        stats[:4] = torch.stack([d.detach(), *diag.values()]).double()
    first = True
    for coef, advantages, slot in ((spec.rl_coef, t.advantages, 4), (spec.opd_coef, t.opd_advantages, 7)):
        if not coef:
            continue
        term, pstats = policy_loss(
            logits,
            t.tokens[None],
            t.behaviour_logprobs[None],
            advantages[None],
            mask,
            spec.rollout_temperature,
            spec.clip_ratio,
            weights=weights,
        )
        total = total + coef * term
        stats[slot] = term.detach()
        if first:
            stats[5:7] = torch.stack([pstats["ratio"], pstats["clipped"]]).double()
            if not spec.distill_coef:
                stats[3] = pstats["entropy"]
            first = False
    return total, stats


def grads(fn, hidden, weight, bias, targets, spec):
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias) if x is not None]
    h, w, b = (*leaves, None) if bias is None else leaves
    loss, stats = fn(h, w, b, targets, spec)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), stats, [x.grad for x in leaves]


SPECS = {
    **{name: HeadLoss(loss_type=name, distill_temperature=1.5, jsd_beta=0.3) for name in LOSS_TYPES},
    "rl_only": HeadLoss(distill_coef=0.0, rl_coef=1.0, rollout_temperature=0.8, clip_ratio=0.1),
    "both": HeadLoss(distill_coef=0.7, rl_coef=0.3, rollout_temperature=1.2, clip_ratio=0.2),
    "opd_only": HeadLoss(distill_coef=0.0, opd_coef=1.0, rollout_temperature=0.9, clip_ratio=0.1),
    "all_three": HeadLoss(distill_coef=0.5, rl_coef=0.2, opd_coef=0.4, clip_ratio=0.2),
}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("chunk_elements", [V, 4 * V, 1 << 20])  # one row a chunk, 4 rows, all at once
def test_equals_the_materialised_path(name, chunk_elements):
    hidden, weight, bias, targets, _ = make_inputs(0)
    spec = HeadLoss(**{**SPECS[name].__dict__, "chunk_elements": chunk_elements})
    loss, stats, got = grads(fused_head_loss, hidden, weight, bias, targets, spec)
    ref_loss, ref_stats, expected = grads(materialised, hidden, weight, bias, targets, spec)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=1e-12)
    for g, e, what in zip(got, expected, ("hidden", "weight", "bias"), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=what)
    assert all(float(g.abs().max()) > 0 for g in got)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_with_the_whole_vocabulary_it_is_the_numpy_divergence(loss_type):
    hidden, weight, _, targets, teacher = make_inputs(1, k=V, bias=False)
    targets.weights = None
    loss, _ = fused_head_loss(hidden, weight, None, targets, HeadLoss(loss_type=loss_type, jsd_beta=0.4))
    log_q = np_log_softmax((hidden @ weight.T).numpy())
    expected = np_divergence(teacher.numpy(), log_q, loss_type, 0.4).sum()
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_float32_and_bfloat16_inputs_get_gradients_of_their_dtype():
    hidden, weight, bias, targets, _ = make_inputs(2)
    spec = HeadLoss(rl_coef=0.5)
    _, _, exact = grads(fused_head_loss, hidden, weight, bias, targets, spec)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        low = [x.to(dtype) for x in (hidden, weight, bias)]
        _, _, got = grads(fused_head_loss, *low, targets, spec)
        for g, e in zip(got, exact, strict=True):
            assert g.dtype == dtype
            assert float((g.double() - e).abs().max()) <= tol * float(e.abs().max())


def test_out_of_vocabulary_teacher_ids_are_a_value_error():
    hidden, weight, bias, targets, _ = make_inputs(3)
    targets.topk_ids[2, 1] = V
    with pytest.raises(ValueError, match="must lie in"):
        fused_head_loss(hidden, weight, bias, targets, HeadLoss())


def test_no_buffer_larger_than_a_chunk_of_logits():
    """Peak temporary memory grows with the chunk, not with the rows: every tensor the loss allocates while
    running is recorded, and none but the outputs and the head's gradient has more than a chunk's rows."""
    rows, vocab, chunk_rows = 512, 257, 8
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(rows, H, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, H, generator=gen, requires_grad=True)
    targets = HeadTargets(
        topk_ids=torch.randint(0, vocab, (rows, 4), generator=gen),
        topk_logprobs=torch.full((rows, 4), -2.0),
        tokens=torch.randint(0, vocab, (rows,), generator=gen),
        behaviour_logprobs=torch.full((rows,), -3.0),
        advantages=torch.randn(rows, generator=gen),
    )
    spec = HeadLoss(rl_coef=1.0, chunk_elements=chunk_rows * vocab)
    largest = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.shape != weight.shape:
                    largest.append(t.numel())
            return out

    with Watch():
        loss, _ = fused_head_loss(hidden, weight, None, targets, spec)
        loss.backward()
    assert max(largest) <= max(chunk_rows * vocab, rows * H)  # a chunk of logits, or the hidden states' gradient
    assert max(largest) < rows * vocab / 10


def test_the_bypassed_head_gives_hidden_states_and_the_head_gives_the_logits_back():
    tok = load_tokenizer("tiny:student")
    model = load_model("tiny:student")
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with head_bypassed(model) as head:
            hidden = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # the head is back afterwards
    assert hidden.shape[-1] == model.config.hidden_size
    torch.testing.assert_close(head(hidden), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, logits)
    assert np.isfinite(hidden.numpy()).all()


def largest_logits_during_a_step(rank, world, init_file, fused, out):
    """One learner step on the tiny student: the shapes of every [.., V]-ended tensor it allocates."""
    import json

    from groups import K, make_groups
    from ranks import join_group, leave_group

    from gkd_async.config.loading import load_config
    from gkd_async.train.fsdp import shard_model
    from gkd_async.train.step import StepAccumulator

    join_group(rank, world, init_file)
    cfg = load_config(None, [f"gkd.teacher_topk={K}", f"trainer.fused_lm_head={fused}", "gkd.use_rl_loss=true"])
    model = shard_model(load_model("tiny:student"), "float32", False)
    vocab = model.config.vocab_size
    groups, pad = make_groups()
    step = StepAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, pad, K, cfg)
    shapes = set()

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, tuple | list) else [result]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab:
                    shapes.add(tuple(t.shape))
            return result

    with Watch():
        step.add([s for group in groups for s in group])
    metrics = step.finish()
    with open(out, "w") as f:
        json.dump({"fused": step.fused, "shapes": sorted(shapes), "loss": metrics["actor/distill_loss"]}, f)
    leave_group(rank, init_file)


def test_the_learner_never_holds_batch_by_time_by_vocab_logits(tmp_path):
    """With `trainer.fused_lm_head` (the default) no [B, T, V] tensor exists in a step; without it, one does;
    the loss is the same."""
    import json

    from ranks import spawn_ranks

    seen = {}
    for fused in ("true", "false"):
        out = tmp_path / f"{fused}.json"
        spawn_ranks(largest_logits_during_a_step, 1, str(tmp_path / f"{fused}.init"), fused, str(out))
        seen[fused] = json.loads(out.read_text())
    assert seen["true"]["fused"] and not seen["false"]["fused"]
    assert seen["true"]["shapes"] and all(len(s) == 2 for s in seen["true"]["shapes"])  # chunks of rows only
    assert any(len(s) == 3 for s in seen["false"]["shapes"])
    assert seen["true"]["loss"] == pytest.approx(seen["false"]["loss"], rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_at_the_real_vocabulary_and_top_256_it_equals_full_logits_in_float32(loss_type):
    """Qwen's 151,936-row tied output layer (tiny:qwen-student's), top-256 of a teacher, fp32 as the learner
    runs: loss and gradients of the fused head equal the full-logits path within 1e-5."""
    weight = load_model("tiny:qwen-student").lm_head.weight.detach().float()
    vocab, rows = weight.shape[0], 6
    assert vocab == 151_936
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(rows, weight.shape[1], generator=gen)
    teacher = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * 3, -1)
    ids = torch.topk(teacher, 256, -1).indices
    targets = HeadTargets(
        topk_ids=ids,
        topk_logprobs=teacher.gather(-1, ids),
        tokens=ids[:, 0],
        behaviour_logprobs=torch.full((rows,), -1.0),
        advantages=torch.zeros(rows),
        weights=torch.ones(rows),
        opd_advantages=torch.zeros(rows),
    )
    spec = HeadLoss(loss_type=loss_type, distill_temperature=1.5, jsd_beta=0.3, chunk_elements=2 * vocab)
    loss, _, got = grads(fused_head_loss, hidden, weight, None, targets, spec)
    ref_loss, _, expected = grads(materialised, hidden, weight, None, targets, spec)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, e, what in zip(got, expected, ("hidden", "weight"), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=what)
    assert float(got[1].abs().max()) > 0


def reweighted_reference(hidden, weight, bias, t, spec):
    """Truncated importance sampling written out over full logits: for a reweighted row, w = min(exp(log pi(y) -
    log pi_behaviour(y)), clip) without gradient, every term multiplied by w, and the PPO ratio taken against
    pi itself (detached); other rows as the plain materialised loss."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logp = torch.log_softmax(logits / spec.rollout_temperature, -1).gather(-1, t.tokens[:, None])[:, 0]
    ratio_to_behaviour = torch.exp(logp.detach() - t.behaviour_logprobs)
    w = torch.where(t.reweighted, ratio_to_behaviour.clamp(max=spec.stale_weight_clip), 1.0)
    mask = torch.ones(1, hidden.shape[0], dtype=torch.bool)
    d, _, _ = distill_loss(
        logits[None], t.topk_ids[None], t.topk_logprobs[None], mask, spec.loss_type, weights=(t.weights * w)[None]
    )
    against = torch.where(t.reweighted, logp.detach(), t.behaviour_logprobs)
    ratio = torch.exp(logp - against)
    eps = spec.clip_ratio
    ppo = -torch.minimum(ratio * t.advantages, ratio.clamp(1 - eps, 1 + eps) * t.advantages)
    return spec.distill_coef * d + spec.rl_coef * (ppo * t.weights * w).sum(), w


def test_stale_rows_are_weighted_by_the_truncated_importance_ratio():
    """pipeline.stale_policy=reweight: the fused loss and its gradients equal the formula written out over full
    logits, with rows under, at and over the clip; its statistics count the reweighted rows, their weights and
    the truncated ones; rows not marked train as before."""
    hidden, weight, bias, targets, _ = make_inputs(3)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    now = torch.log_softmax(logits / 0.8, -1).gather(-1, targets.tokens[:, None])[:, 0]
    shifts = torch.tensor([0.0, -2.0, 1.0, 0.3, -0.1, 2.0, 0.0, -3.0, 0.5, 0.0, 1.5, -1.0, 0.2], dtype=torch.float64)
    targets.behaviour_logprobs = now - shifts  # ratio to the behaviour policy: exp(shift), 0.05 to 7.4
    targets.reweighted = torch.arange(N) % 3 != 0
    spec = HeadLoss(distill_coef=0.6, rl_coef=0.4, rollout_temperature=0.8, clip_ratio=0.2, stale_weight_clip=2.0)
    loss, stats, got = grads(fused_head_loss, hidden, weight, bias, targets, spec)
    ref_loss, w = reweighted_reference(hidden, weight, bias, targets, spec)
    _, _, expected = grads(lambda *a: (reweighted_reference(*a)[0], None), hidden, weight, bias, targets, spec)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    stale = targets.reweighted
    named = dict(zip(STAT_NAMES, stats.tolist(), strict=True))
    assert named["reweighted"] == int(stale.sum()) == 8
    assert named["is_weight"] == pytest.approx(float(w[stale].sum()))
    assert named["is_clipped"] == int((stale & (shifts > np.log(2.0))).sum()) == 3
    assert float(w[~stale].min()) == float(w[~stale].max()) == 1.0
    unweighted = HeadLoss(**{**spec.__dict__, "stale_weight_clip": 0.0})
    assert not torch.allclose(grads(fused_head_loss, hidden, weight, bias, targets, unweighted)[0], loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_teachers_hidden_states_give_the_whole_vocabulary_loss_and_its_gradients(loss_type):
    """gkd.teacher_signal=hidden: from the teacher's hidden states and output layer, the fused loss (fp32, chunks
    of 3 rows) is the divergence over the whole vocabulary between both models' tempered full logits (numpy,
    float64) and its gradients those of that formula written out over full logits (torch autograd, float64),
    within 1e-5; the support holds all of both models' mass."""
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen)
    bias = torch.randn(V, generator=gen)
    teacher_h = torch.randn(N, 9, generator=gen) * 2
    teacher_w, teacher_b = torch.randn(V, 9, generator=gen), torch.randn(V, generator=gen)
    row_weights, temperature, beta = torch.rand(N, generator=gen), 2.0, 0.3
    targets = HeadTargets(
        topk_ids=torch.zeros(N, 0, dtype=torch.long),
        topk_logprobs=torch.zeros(N, 0),
        tokens=torch.randint(0, V, (N,), generator=gen),
        behaviour_logprobs=-torch.rand(N, generator=gen),
        advantages=torch.zeros(N),
        weights=row_weights,
        teacher_hidden=teacher_h,
        teacher_weight=teacher_w,
        teacher_bias=teacher_b,
    )
    spec = HeadLoss(loss_type=loss_type, distill_temperature=temperature, jsd_beta=beta, chunk_elements=3 * V)
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, stats = fused_head_loss(*params, targets, spec)
    loss.backward()

    student = (hidden.double() @ weight.double().T + bias.double()).numpy() / temperature
    teacher = (teacher_h.double() @ teacher_w.double().T + teacher_b.double()).numpy() / temperature
    per_row = np_divergence(np_log_softmax(teacher), np_log_softmax(student), loss_type, beta)
    assert float(loss.detach()) == pytest.approx(float((per_row * row_weights.double().numpy()).sum()), rel=1e-5)
    assert stats[STAT_NAMES.index("teacher_topk_mass")] == pytest.approx(N)
    assert stats[STAT_NAMES.index("student_topk_mass")] == pytest.approx(N)

    reference = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    log_q = torch.log_softmax(torch.nn.functional.linear(*reference) / temperature, -1)
    log_p = torch.log_softmax(torch.from_numpy(teacher), -1)
    p, q = log_p.exp(), log_q.exp()
    if loss_type == "forward_kl":
        rows = (p * (log_p - log_q)).sum(-1)
    elif loss_type == "reverse_kl":
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    (rows * row_weights.double()).sum().backward()
    for got, want in zip(params, reference, strict=True):
        np.testing.assert_allclose(got.grad.numpy(), want.grad.numpy(), atol=1e-5)
