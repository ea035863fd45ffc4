"""The HF engines against an independent transformers computation, and the learner's alignment."""

import numpy as np
import pytest
import torch
from reference import (
    full_logprobs,
    np_divergence,
    nucleus_logprob,
    nudged_weights,
    published_lora_weights,
    trained_lora_student,
)

from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine
from gkd_async.loss.topk import distill_loss
from gkd_async.models.loading import load_model, load_tokenizer, tied_aliases, with_tied
from gkd_async.train.batching import TrainSample, collate, micro_batches


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:student")


@pytest.fixture(scope="module")
def rollout(tok):
    return HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id)


@pytest.fixture(scope="module")
def teacher(tok):
    return HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id)


def prompt_ids(tok, text="12+34="):
    return np.asarray(tok(text)["input_ids"], dtype=np.int32)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_behaviour_logprobs_are_of_the_sampling_distribution(tok, rollout, top_p):
    """log_softmax(z / T) at top_p = 1, as the PPO ratio expects; renormalised over the nucleus below 1."""
    prompt = prompt_ids(tok)
    samples = rollout.generate(prompt, n=3, temperature=0.7, top_p=top_p, max_new_tokens=12, seed=5)
    for s in samples:
        ref = full_logprobs(rollout.model, prompt, s.response_ids, temperature=0.7)
        expected = [nucleus_logprob(ref[t], token, top_p) for t, token in enumerate(s.response_ids)]
        np.testing.assert_allclose(s.logprobs, expected, atol=2e-5)


def test_published_weights_of_a_tied_student_load_tied_and_sample_from_them(tok):
    """The learner publishes a tied weight once, under the embedding's name; the engine ties it back."""
    engine = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id)
    published = nudged_weights(engine.model)
    assert "lm_head.weight" not in published and "model.embed_tokens.weight" in published
    engine.load_weights(published, 3)
    assert engine.version == 3 and engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    updated = load_model("tiny:student")
    updated.load_state_dict(with_tied(published, tied_aliases(updated)))
    prompt = prompt_ids(tok)
    for s in engine.generate(prompt, n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5):
        ref = full_logprobs(updated, prompt, s.response_ids)
        np.testing.assert_allclose(s.logprobs, ref[np.arange(len(s.response_ids)), s.response_ids], atol=2e-5)
    with pytest.raises(ValueError, match="do not fit"):  # a weight missing that is not a tied alias
        engine.load_weights({k: v for k, v in published.items() if k != "model.norm.weight"}, 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_weights_are_adopted_not_copied_and_stay_tied_version_after_version(tok, dtype):
    """The engine takes the published tensors as its parameters (in its own dtype: converted once, the tied pair
    still one tensor), so a version costs no second copy; the next version loads the same way."""
    engine = HFRolloutEngine("tiny:student", dtype, tok.pad_token_id, tok.eos_token_id)
    for version, scale in ((1, 1.5), (2, 0.5)):
        published = {
            name: t.float() * scale for name, t in engine.model.state_dict().items() if name != "lm_head.weight"
        }
        engine.load_weights(published, version)
        model = engine.model
        assert model.lm_head.weight is model.model.embed_tokens.weight and engine.version == version
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
        for name, param in model.named_parameters():
            if dtype == "float32":  # the very tensor handed over
                assert param.data_ptr() == published[name].data_ptr(), name
            else:
                assert torch.equal(param, published[name].to(torch.bfloat16)), name


def test_a_lora_students_merged_weights_sample_with_the_adapters_log_probs(tok):
    """model.lora: the learner publishes W + scale * B @ A under the plain names; the engine's behaviour
    log-probs are then those of the learner's model with its adapters (its own forward, not a merge)."""
    lora_model = trained_lora_student()
    published = published_lora_weights(lora_model)
    assert not any("lora_" in name or "base_layer" in name for name in published)
    engine = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id)
    before = engine.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    engine.load_weights(published, 2)
    assert not torch.equal(engine.model.model.layers[0].self_attn.q_proj.weight, before)
    prompt = prompt_ids(tok)
    for s in engine.generate(prompt, n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5):
        ref = full_logprobs(lora_model, prompt, s.response_ids)
        np.testing.assert_allclose(s.logprobs, ref[np.arange(len(s.response_ids)), s.response_ids], atol=1e-4)


def test_sampling_is_seeded_and_stops_after_eos(tok, rollout):
    prompt = prompt_ids(tok)
    a = rollout.generate(prompt, 4, 1.0, 1.0, 20, seed=11)
    b = rollout.generate(prompt, 4, 1.0, 1.0, 20, seed=11)
    c = rollout.generate(prompt, 4, 1.0, 1.0, 20, seed=12)
    assert all(np.array_equal(x.response_ids, y.response_ids) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.response_ids, y.response_ids) for x, y in zip(a, c, strict=True))
    for s in a:
        eos = np.flatnonzero(s.response_ids == tok.eos_token_id)
        assert len(eos) == 0 or eos[0] == len(s.response_ids) - 1


def test_groups_sampled_together_get_what_each_gets_alone(tok, rollout):
    """Left padding, the KV cache and the other groups of the call change nothing: each sample draws from
    its own seeded stream, and its log-probs are those of an unpadded forward pass."""
    prompts = [prompt_ids(tok, text) for text in ("12+34=", "5=", "99+1+7=", "3+4=")]
    seeds = [7, 8, 9, 10]
    together = rollout.generate_groups(prompts, seeds, 50, 1.0, 1.0, 24)  # EOS is rare untrained
    lengths = set()
    for prompt, seed, group in zip(prompts, seeds, together, strict=True):
        alone = rollout.generate(prompt, 50, 1.0, 1.0, 24, seed)
        for a, b in zip(group, alone, strict=True):
            np.testing.assert_array_equal(a.response_ids, b.response_ids)
            ref = full_logprobs(rollout.model, prompt, a.response_ids)
            np.testing.assert_allclose(a.logprobs, ref[np.arange(len(a.response_ids)), a.response_ids], atol=2e-5)
            lengths.add(len(a.response_ids))
    assert len(lengths) > 1, "every response had the same length: the end-of-sequence path was not exercised"


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins expecting at least 5 draws (the rest pooled), and its dof."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize(("temperature", "top_p"), [(1.5, 1.0), (1.0, 0.7)])
def test_samples_follow_the_tempered_nucleus_distribution(tok, temperature, top_p):
    """20,000 first tokens of a model with sharpened logits against the reference distribution: a
    chi-square statistic within 6 standard deviations of its mean, nothing outside the nucleus, while the
    same draws are far from the distribution at temperature 1.2 x off (so the check can fail). The untied
    teacher, whose output layer can be sharpened without changing its input embedding."""
    engine = HFRolloutEngine("tiny:teacher", "float32", tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(12.0)
    prompt = prompt_ids(tok, "4+5=")
    draws = 20_000
    samples = engine.generate(prompt, draws, temperature, top_p, 1, seed=3)
    counts = np.bincount([int(s.response_ids[0]) for s in samples], minlength=engine.model.config.vocab_size)

    def reference(t: float) -> tuple[np.ndarray, np.ndarray]:
        probs = np.exp(full_logprobs(engine.model, prompt, np.zeros(1, np.int64), t)[0])
        order = np.argsort(-probs)
        outside = order[(np.cumsum(probs[order]) - probs[order]) >= top_p]
        probs[outside] = 0.0
        return probs / probs.sum(), outside

    probs, outside = reference(temperature)
    assert counts[outside].sum() == 0
    stat, dof = chi_square(counts, probs)
    assert dof > 10, "the sharpened distribution is too peaked to test"
    assert stat < dof + 6 * np.sqrt(2 * dof)
    wrong, dof_wrong = chi_square(counts, reference(temperature * 1.2)[0])
    assert wrong > dof_wrong + 6 * np.sqrt(2 * dof_wrong)


def test_groups_per_call_follow_the_token_budget(tok):
    engine = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id, max_batch_tokens=400)
    # rows x (longest prompt so far + new tokens): 4 x (10 + 40) = 200 per group, so two groups fit.
    assert engine.groups_per_call([10, 10, 10], n=4, max_new_tokens=40) == 2
    assert engine.groups_per_call([10, 60, 10], n=4, max_new_tokens=40) == 1  # the longer prompt pads both
    assert engine.groups_per_call([500], n=4, max_new_tokens=40) == 1  # one group always goes


def test_teacher_rows_are_the_teachers_distribution_of_each_response_token(tok, teacher):
    pairs = [
        (prompt_ids(tok, "1+2="), prompt_ids(tok, "3<eos>")),
        (prompt_ids(tok, "99+1="), prompt_ids(tok, "100")),
        (prompt_ids(tok, "7="), prompt_ids(tok, "7 seven")),
    ]
    scored = teacher.score(pairs, k=5, temperature=1.5, batch_size=2, sampled=True)  # padded, mixed lengths
    for (prompt, response), (ids, lps, tokens) in zip(pairs, scored, strict=True):
        ref = full_logprobs(teacher.model, prompt, response, temperature=1.5)
        expected_ids = np.argsort(-ref, axis=-1)[:, :5]
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(lps, np.take_along_axis(ref, expected_ids, -1), atol=1e-5)
        np.testing.assert_allclose(tokens, ref[np.arange(len(response)), response], atol=1e-5)  # the tokens' own
    for (_, response), (ids, lps, tokens) in zip(pairs, teacher.score(pairs, 0, 1.5, 2, sampled=True), strict=True):
        assert ids.shape == lps.shape == (len(response), 0) and tokens.shape == (len(response),)


def test_a_real_vocabulary_teacher_scores_response_rows_a_chunk_at_a_time():
    """At V = 151,936 the teacher's head runs on response rows only, 16 rows at a time (hidden size 64),
    never on [batch, prompt + response, V]; the result is the full-logits one, and so is the materialised
    path's (a head the fused path does not support)."""
    teacher = HFTeacherEngine("tiny:qwen-teacher", "float32", pad_id=0)
    assert teacher.head is not None and teacher.chunk_rows == 16
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(1, 151_936, n).astype(np.int32), rng.integers(1, 151_936, r).astype(np.int32))
             for n, r in [(7, 2 * teacher.chunk_rows + 3), (3, 5), (12, 1)]]  # fmt: skip
    chunked = teacher.score(pairs, k=8, temperature=0.7, batch_size=2, sampled=True)
    teacher.head = None
    materialised = teacher.score(pairs, k=8, temperature=0.7, batch_size=3, sampled=True)
    for (prompt, response), *results in zip(pairs, chunked, materialised, strict=True):
        ref = full_logprobs(teacher.model, prompt, response, temperature=0.7)
        expected_ids = np.argsort(-ref, axis=-1)[:, :8]
        for ids, lps, tokens in results:
            np.testing.assert_array_equal(ids, expected_ids)
            np.testing.assert_allclose(lps, np.take_along_axis(ref, expected_ids, -1), atol=1e-5)
            np.testing.assert_allclose(tokens, ref[np.arange(len(response)), response], atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny:teacher", "tiny:qwen-teacher"])
def test_prompts_scored_once_for_their_group_give_what_each_sample_gets_alone(spec):
    """teacher.share_prompts: groups of 1, 4 and 8 samples behind one prefill each (responses of 1 token, a few,
    and past a chunk of rows; padded within a forward of 3), against the full-logits reference of each sample
    and the unshared scoring: the same top-k ids, log-probs within 1e-5 (fp32)."""
    teacher = HFTeacherEngine(spec, "float32", pad_id=0, share_prompts=True)
    vocab, rng = teacher.vocab_size, np.random.default_rng(1)
    pairs = []
    for group, prompt_length in [(1, 5), (4, 9), (8, 3)]:
        prompt = rng.integers(1, vocab, prompt_length).astype(np.int32)
        lengths = rng.choice([1, 2, 6, teacher.chunk_rows + 3], size=group)
        pairs += [(prompt, rng.integers(1, vocab, n).astype(np.int32)) for n in lengths]
    order = rng.permutation(len(pairs))  # a group's samples need not be next to each other
    pairs = [pairs[i] for i in order]
    shared = teacher.score(pairs, k=6, temperature=0.8, batch_size=3, sampled=True)
    teacher.share_prompts = False
    alone = teacher.score(pairs, k=6, temperature=0.8, batch_size=3, sampled=True)
    for (prompt, response), (ids, lps, tokens), (ids_alone, lps_alone, _) in zip(pairs, shared, alone, strict=True):
        ref = full_logprobs(teacher.model, prompt, response, temperature=0.8)
        np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1)[:, :6])
        np.testing.assert_allclose(lps, np.take_along_axis(ref, ids.astype(np.int64), -1), atol=1e-5)
        np.testing.assert_allclose(tokens, ref[np.arange(len(response)), response], atol=1e-5)
        np.testing.assert_array_equal(ids, ids_alone)
        np.testing.assert_allclose(lps, lps_alone, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_learner_alignment_gives_the_full_vocab_kl_between_the_two_models(tok, rollout, teacher, packed):
    """With k = V, the loss over collated micro-batches equals KL(teacher || student) computed from
    each model's own unpadded forward pass: padded rows, and (trainer.pack_sequences) rows of several samples
    end to end whose attention must stay within each sample."""
    student = load_model("tiny:student")
    vocab = teacher.vocab_size
    samples, expected = [], 0.0
    for i, text in enumerate(["1+2=", "45+67=", "8="]):
        prompt = prompt_ids(tok, text)
        for s in rollout.generate(prompt, 2, 1.0, 1.0, 8, seed=i):
            ((ids, lps),) = teacher.score([(prompt, s.response_ids)], k=vocab, temperature=1.0, batch_size=1)
            samples.append(TrainSample(f"{i}", f"{i}", 0, prompt, s.response_ids, ids, lps, s.logprobs))
            log_p = full_logprobs(teacher.model, prompt, s.response_ids)
            log_q = full_logprobs(student, prompt, s.response_ids)
            expected += (np.exp(log_p) * (log_p - log_q)).sum()
    total = 0.0
    batches = micro_batches(samples, max_count=4, max_tokens=40 if packed else 10_000, packed=packed)
    assert not packed or max(len(b) for b in batches) >= 3  # rows of several samples
    for batch in batches:
        mb = collate(batch, tok.pad_token_id, vocab, packed)
        with torch.no_grad():
            logits = student(**mb.model_inputs()).logits[:, :-1].double()
        part, _, _ = distill_loss(logits, mb.topk_ids, mb.topk_logprobs.double(), mb.response_mask, "forward_kl")
        total += part.item()
    assert total == pytest.approx(expected, rel=1e-4)


def test_a_packed_row_of_the_real_vocabulary_student_gives_each_sample_its_own_logits():
    """tiny:qwen-student (tied Qwen3, V = 151,936): in a packed row, every response position's log-probs equal
    those of the sample's own unpadded forward pass; without the restarting position ids they do not."""
    student = load_model("tiny:qwen-student")
    rng = np.random.default_rng(0)
    samples = []
    for i, (p, r) in enumerate([(5, 7), (3, 2), (9, 4)]):
        ids = rng.integers(10, 5000, p + r).astype(np.int32)
        samples.append(
            TrainSample(
                f"{i}",
                f"{i}",
                0,
                ids[:p],
                ids[p:],
                np.zeros((r, 1), np.int32),
                np.zeros((r, 1), np.float32),
                np.zeros(r, np.float32),
            )
        )
    mb = collate(samples, 0, 1, packed=True)
    with torch.no_grad():
        rows = torch.log_softmax(student(**mb.model_inputs()).logits[0, :-1].double(), -1)[mb.response_mask[0]]
        unaware = student(input_ids=mb.input_ids).logits[0, :-1].double().log_softmax(-1)[mb.response_mask[0]]
    expected = np.concatenate([full_logprobs(student, s.prompt_ids, s.response_ids) for s in samples])
    np.testing.assert_allclose(rows.numpy(), expected, atol=1e-5)
    assert np.abs(unaware.numpy() - expected).max() > 1e-2


def test_micro_batches_respect_count_and_token_budget():
    def sample(n):
        return TrainSample(
            "s",
            "g",
            0,
            np.zeros(2, np.int32),
            np.zeros(n, np.int32),
            np.zeros((n, 1), np.int32),
            np.zeros((n, 1), np.float32),
            np.zeros(n, np.float32),
        )

    samples = [sample(n) for n in (3, 3, 8, 1, 1, 1, 30)]
    batches = micro_batches(samples, max_count=3, max_tokens=12)
    assert [len(b) for b in batches] == [2, 1, 3, 1]
    for b in batches[:-1]:
        assert max(s.length for s in b) * len(b) <= 12
    assert sum(len(b) for b in batches) == len(samples)
    rows = micro_batches(samples, max_count=3, max_tokens=12, packed=True)  # lengths 5, 5, 10, 3, 3, 3, 32
    assert sorted(sorted(s.length for s in row) for row in rows) == [[3, 3, 3], [5, 5], [10], [32]]
    assert all(sum(s.length for s in row) <= 12 for row in rows if len(row) > 1)


def union_divergence(student, prompt, response, ids, lps, loss_type):
    """The loss's divergence over the ids' support plus the tail bucket, summed over the response rows."""
    mb = collate(
        [TrainSample("s", "g", 0, prompt, response, ids, lps, np.zeros(len(response), np.float32))], 0, ids.shape[1]
    )
    with torch.no_grad():
        logits = student(**mb.model_inputs()).logits[:, :-1].double()
    total, _, _ = distill_loss(logits, mb.topk_ids, mb.topk_logprobs.double(), mb.response_mask, loss_type)
    return total.item()


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_the_students_own_top_k_and_the_union_with_the_teachers(tok, rollout, teacher, loss_type):
    """gkd.topk_source=union: the rollout records the ids of the student's top-k at each position (those of its
    own unpadded forward pass), the teacher scores its top-k and its log-probs at those ids (the reference's;
    an id already in its top-k absent), and the divergence over the union equals the full-vocabulary one (numpy)
    when the student's top-k is the vocabulary; with a smaller one it lies between the divergence over the
    teacher's top-k alone and the full one (merging categories never raises an f-divergence)."""
    student, vocab, prompt = rollout.model, teacher.vocab_size, prompt_ids(tok, "23+58=")
    (sample,) = rollout.generate_groups([prompt], [5], 1, 1.0, 1.0, 8, topk=vocab)[0]
    (small,) = rollout.generate_groups([prompt], [5], 1, 1.0, 1.0, 8, topk=12)[0]
    log_q = full_logprobs(student, prompt, sample.response_ids)
    np.testing.assert_array_equal(small.response_ids, sample.response_ids)  # the same draws
    for row in range(len(sample.response_ids)):
        assert set(small.topk_ids[row]) == set(np.argsort(-log_q[row])[:12])
    log_p = full_logprobs(teacher.model, prompt, sample.response_ids)
    full = np_divergence(log_p, log_q, loss_type, 0.5).sum()
    pair = [(prompt, sample.response_ids)]
    ((ids, lps),) = teacher.score(pair, 16, 1.0, 1, extra_ids=[sample.topk_ids])
    assert ids.shape == (len(sample.response_ids), 16 + vocab)
    in_top = (sample.topk_ids[:, :, None] == ids[:, None, :16]).any(-1)
    extra = lps[:, 16:]
    assert np.isneginf(extra[in_top]).all() and in_top.sum(1).tolist() == [16] * len(ids)  # each counted once
    np.testing.assert_allclose(extra[~in_top], np.take_along_axis(log_p, sample.topk_ids, 1)[~in_top], atol=1e-5)
    assert union_divergence(student, prompt, sample.response_ids, ids, lps, loss_type) == pytest.approx(full, rel=1e-4)
    ((ids, lps),) = teacher.score(pair, 16, 1.0, 1, extra_ids=[small.topk_ids])
    union = union_divergence(student, prompt, sample.response_ids, ids, lps, loss_type)
    teacher_only = union_divergence(student, prompt, sample.response_ids, ids[:, :16], lps[:, :16], loss_type)
    assert teacher_only < union - 1e-6 and union <= full + 1e-9
    ((ids_s, lps_s),) = teacher.score(pair, 0, 1.0, 1, extra_ids=[small.topk_ids])  # gkd.topk_source=student
    np.testing.assert_array_equal(ids_s, small.topk_ids)
    np.testing.assert_allclose(lps_s, np.take_along_axis(log_p, small.topk_ids, 1), atol=1e-5)


@pytest.mark.parametrize("spec, share", [("tiny:qwen-student", False), ("tiny:teacher", True)])
def test_the_teachers_hidden_states_and_output_layer_give_its_logits(spec, share):
    """gkd.teacher_signal=hidden: the HF teacher's hidden states (float32 on the wire), through the output layer
    the learner loads from the checkpoint (tied: the input embedding, at the real 151,936-token vocabulary; untied,
    with prompts shared), give each response row's log-probs of an unpadded forward pass (transformers) within
    1e-5; in bfloat16 within its rounding."""
    from gkd_async.models.hidden_signal import hidden_from_wire, load_output_head

    teacher = HFTeacherEngine(spec, "float32", pad_id=0, share_prompts=share)
    head, rng = load_output_head(spec, teacher.vocab_size), np.random.default_rng(3)
    prompt = rng.integers(1, 300, 6).astype(np.int32)
    pairs = [(prompt, rng.integers(1, 300, n).astype(np.int32)) for n in (1, 5, teacher.chunk_rows + 2)]
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 0.1)):
        scores = teacher.score(pairs, 0, 1.0, batch_size=2, sampled=True, hidden_dtype=dtype)
        for (prompt, response), (ids, _, tokens, hidden) in zip(pairs, scores, strict=True):
            assert ids.shape == (len(response), 0) and hidden.shape == (len(response), head.hidden_size)
            logits = torch.nn.functional.linear(hidden_from_wire(hidden).double(), head.weight.double())
            got = torch.log_softmax(logits, -1).numpy()
            ref = full_logprobs(teacher.model, prompt, response)
            np.testing.assert_allclose(got, ref, atol=tolerance)
            np.testing.assert_allclose(tokens, ref[np.arange(len(response)), response], atol=1e-5)
    assert np.abs(got - ref).max() > 1e-5  # bfloat16 is not float32


def test_a_teacher_whose_logits_are_not_its_output_layers_is_refused(tmp_path):
    """Gemma-2's soft-capping after the output layer: the learner would compute other logits; and a teacher with
    fewer output rows than the student's vocabulary. Each refused in one line that names it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gkd_async.models.hidden_signal import load_output_head
    from gkd_async.models.loading import ModelLoadError

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)  # fmt: skip
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **small)).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(ModelLoadError, match="final_logit_softcapping=30.0.*gkd.teacher_signal=topk"):
        load_output_head(str(tmp_path / "gemma2"), 64)
    with pytest.raises(ModelLoadError, match="320 output rows, fewer than the student's 400"):
        load_output_head("tiny:teacher", 400)
