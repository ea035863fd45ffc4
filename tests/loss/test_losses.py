import numpy as np
import pytest
import torch
from reference import np_divergence, np_log_softmax

from gkd_async.loss.topk import LOSS_TYPES, distill_loss


def make_batch(seed, batch=2, steps=5, vocab=11, k=None, temperature=1.0, scale=2.0, dtype=torch.float64):
    """Student logits, the teacher's top-k at `temperature`, a mask, and the teacher's full log-probs."""
    rng = np.random.default_rng(seed)
    student = rng.normal(scale=scale, size=(batch, steps, vocab))
    teacher_log_p = np_log_softmax(rng.normal(scale=scale, size=(batch, steps, vocab)) / temperature)
    k = vocab if k is None else k
    ids = np.argsort(-teacher_log_p, axis=-1)[..., :k]
    topk = np.take_along_axis(teacher_log_p, ids, -1)
    mask = rng.random((batch, steps)) < 0.7
    mask[0, 0] = True
    return (
        torch.tensor(student, dtype=dtype),
        torch.tensor(ids),
        torch.tensor(topk, dtype=dtype),
        torch.tensor(mask),
        teacher_log_p,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equals_full_vocab_divergence_when_k_is_v(loss_type, temperature):
    logits, ids, topk, mask, teacher_log_p = make_batch(0, temperature=temperature)
    total, count, _ = distill_loss(logits, ids, topk, mask, loss_type, temperature=temperature, beta=0.3)
    student_log_q = np_log_softmax(logits.numpy() / temperature)
    expected = np_divergence(teacher_log_p, student_log_q, loss_type, 0.3)[mask.numpy()].sum()
    assert count == int(mask.sum())
    assert total.item() == pytest.approx(expected, abs=1e-5, rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_matches_full_vocab_too(loss_type):
    logits, ids, topk, mask, teacher_log_p = make_batch(5, vocab=50, dtype=torch.float32)
    total, _, _ = distill_loss(logits, ids, topk, mask, loss_type)
    expected = np_divergence(teacher_log_p, np_log_softmax(logits.double().numpy()), loss_type, 0.5)
    assert total.item() == pytest.approx(expected[mask.numpy()].sum(), abs=1e-4, rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_lower_bound_of_full_vocab_divergence_when_k_below_v(loss_type, k):
    for seed in range(5):
        logits, ids, topk, mask, teacher_log_p = make_batch(seed, vocab=13, k=k)
        total, _, _ = distill_loss(logits, ids, topk, mask, loss_type)
        full = np_divergence(teacher_log_p, np_log_softmax(logits.numpy()), loss_type, 0.5)
        per_token_full = full[mask.numpy()]
        assert total.item() <= per_token_full.sum() + 1e-9
        assert total.item() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_when_student_is_the_teacher(loss_type):
    rng = np.random.default_rng(7)
    logits = torch.tensor(rng.normal(size=(2, 4, 20)))
    log_q = torch.log_softmax(logits, -1)
    topk, ids = log_q.topk(6, dim=-1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    total, _, _ = distill_loss(logits, ids, topk, mask, loss_type)
    assert abs(total.item()) < 1e-12


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type):
    logits, ids, topk, mask, _ = make_batch(3, batch=2, steps=3, vocab=7, k=3)
    logits.requires_grad_(True)

    def fn(x):
        return distill_loss(x, ids, topk, mask, loss_type, temperature=1.5, beta=0.4, chunk_elements=14)[0]

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_position_weights_scale_each_term_and_its_gradient(loss_type):
    """Weighted (how seq-mean aggregation is built): the full-vocabulary reference's weighted sum, chunked
    over positions, and a gradient that passes gradcheck with the weights."""
    logits, ids, topk, mask, teacher_log_p = make_batch(5, batch=3, steps=4)
    weights = torch.tensor(np.random.default_rng(1).uniform(0.1, 2.0, size=mask.shape))
    total, _, _ = distill_loss(logits, ids, topk, mask, loss_type, beta=0.3, chunk_elements=22, weights=weights)
    per_token = np_divergence(teacher_log_p, np_log_softmax(logits.numpy()), loss_type, 0.3)
    expected = (per_token * weights.numpy())[mask.numpy()].sum()
    assert total.item() == pytest.approx(expected, abs=1e-6, rel=1e-6)
    logits.requires_grad_(True)

    def fn(x):
        return distill_loss(x, ids, topk, mask, loss_type, beta=0.3, chunk_elements=22, weights=weights)[0]

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_positions_contribute_nothing(loss_type):
    logits, ids, topk, mask, _ = make_batch(4, k=4)
    logits.requires_grad_(True)
    total, _, _ = distill_loss(logits, ids, topk, mask, loss_type)
    total.backward()
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)

    garbage_ids, garbage_logits = ids.clone(), logits.detach().clone()
    garbage_ids[~mask] = -1
    garbage_logits[~mask] = 1e6
    again, _, _ = distill_loss(garbage_logits, garbage_ids, topk, mask, loss_type)
    assert again.item() == pytest.approx(total.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_global_normalisation_is_independent_of_micro_batches_and_chunks(loss_type):
    logits, ids, topk, mask, _ = make_batch(6, batch=6, steps=7, vocab=9, k=5)
    global_tokens = int(mask.sum())

    whole = logits.clone().requires_grad_(True)
    total, _, _ = distill_loss(whole, ids, topk, mask, loss_type)
    (total / global_tokens).backward()

    split = logits.clone().requires_grad_(True)
    loss_sum = 0.0
    for rows in ([0], [1, 2, 3], [4, 5]):
        part, count, _ = distill_loss(split[rows], ids[rows], topk[rows], mask[rows], loss_type, chunk_elements=9)
        (part / global_tokens).backward()
        loss_sum += part.item() / global_tokens
    assert loss_sum == pytest.approx(total.item() / global_tokens, rel=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-10, atol=1e-12)


def test_diagnostics_match_numpy():
    logits, ids, topk, mask, teacher_log_p = make_batch(8, vocab=12, k=4)
    _, count, diag = distill_loss(logits, ids, topk, mask, "forward_kl")
    m = mask.numpy()
    log_q = np_log_softmax(logits.numpy())
    teacher_mass = np.exp(topk.numpy()).sum(-1)[m].sum()
    student_mass = np.exp(np.take_along_axis(log_q, ids.numpy(), -1)).sum(-1)[m].sum()
    entropy = -(np.exp(log_q) * log_q).sum(-1)[m].sum()
    assert diag["teacher_topk_mass"].item() == pytest.approx(teacher_mass, rel=1e-10)
    assert diag["student_topk_mass"].item() == pytest.approx(student_mass, rel=1e-10)
    assert diag["student_entropy"].item() == pytest.approx(entropy, rel=1e-10)
    assert not diag["student_entropy"].requires_grad


def test_bfloat16_logits_get_float32_math_and_gradients_of_their_dtype():
    logits, ids, topk, mask, teacher_log_p = make_batch(9, vocab=64, k=8, dtype=torch.float32)
    low = logits.to(torch.bfloat16).requires_grad_(True)
    total, _, _ = distill_loss(low, ids, topk.to(torch.float16), mask, "forward_kl")
    assert total.dtype == torch.float32
    total.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


def test_negative_infinite_teacher_logprobs_stay_finite():
    logits, ids, topk, mask, _ = make_batch(10, vocab=8, k=4)
    topk[..., -1] = float("-inf")
    logits.requires_grad_(True)
    for loss_type in LOSS_TYPES:
        total, _, _ = distill_loss(logits, ids, topk, mask, loss_type)
        (grad,) = torch.autograd.grad(total, logits)
        assert torch.isfinite(total) and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(loss_type="kl"), "loss_type"),
        (lambda a: a.update(mask=a["mask"].int()), "mask"),
        (lambda a: a.update(teacher_topk_ids=a["teacher_topk_ids"] + 100), "vocabulary"),
        (lambda a: a.update(teacher_topk_logprobs=a["teacher_topk_logprobs"][:, :2]), "log-probs"),
        (lambda a: a.update(temperature=0.0), "temperature"),
        (lambda a: a.update(loss_type="jsd", beta=1.0), "beta"),
    ],
)
def test_bad_inputs_are_value_errors(change, message):
    logits, ids, topk, mask, _ = make_batch(11, k=3)
    args = dict(
        student_logits=logits,
        teacher_topk_ids=ids,
        teacher_topk_logprobs=topk,
        mask=mask,
        loss_type="forward_kl",
        temperature=1.0,
        beta=0.5,
    )
    change(args)
    with pytest.raises(ValueError, match=message):
        distill_loss(**args)


def np_bucketed(student_log_q, ids, log_p_top, loss_type, beta=0.5):
    """The (k + 1)-category divergence of one row in numpy: the given entries, then the tail."""
    log_q_top = student_log_q[ids]
    p_tail, q_tail = 1 - np.exp(log_p_top).sum(), 1 - np.exp(log_q_top).sum()
    log_p = np.append(log_p_top, np.log(max(p_tail, 1e-300)))
    log_q = np.append(log_q_top, np.log(q_tail))
    return np_divergence(log_p, log_q, loss_type, beta)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_absent_entries_put_the_students_mass_in_the_tail(loss_type):
    """-inf teacher entries (a cross-tokenizer teacher's rows) are no categories: the divergence equals the one
    over the present entries alone, a row with none present contributes 0, and so does its gradient."""
    logits, ids, topk, mask, _ = make_batch(11, batch=1, steps=4, vocab=9, k=5)
    mask[:] = True
    absent = torch.zeros_like(topk, dtype=torch.bool)
    absent[0, 0, [1, 3]] = True  # two absent in row 0
    absent[0, 1, :] = True  # none present in row 1
    topk = topk.masked_fill(absent, float("-inf"))
    logits.requires_grad_(True)
    total, _, _ = distill_loss(logits, ids, topk, mask, loss_type)
    log_q = np_log_softmax(logits.detach().numpy()[0])
    expected = sum(
        np_bucketed(log_q[t], ids[0, t][~absent[0, t]].numpy(), topk[0, t][~absent[0, t]].numpy(), loss_type)
        for t in range(4)
        if not absent[0, t].all()
    )
    assert float(total.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.all(grad[0, 1] == 0) and torch.isfinite(grad).all()
