"""Distilling from a teacher of another tokenizer (teacher.cross_tokenizer): the character-level student and
tiny:teacher-pairs, whose vocabulary has other ids and one token per pair of digits."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from reference import full_logprobs
from small_runs import joins, observe, small, trained_log

from gkd_async.config.loading import load_config
from gkd_async.data.prompts import PromptFormat, load_prompts
from gkd_async.engines.base import TeacherEngine
from gkd_async.engines.cross_tokenizer import PROMPT_FIELD, Branches, TokenBridge, prompt_source
from gkd_async.engines.hf import HFTeacherEngine
from gkd_async.errors import ConfigError
from gkd_async.models.loading import ModelLoadError, load_model, load_tokenizer, model_vocab_size
from gkd_async.preflight.checks import check_teacher_fits_student
from gkd_async.rewards.loading import compute_reward
from gkd_async.train.metrics import read_metrics
from gkd_async.transport.records import RolloutRecord, decode_scored_record, encode_rollout_record
from gkd_async.transport.streams import StreamNames
from workers.common import RunContext
from workers.launch.run import run_pipeline
from workers.teacher import TeacherScorer

TEACHER = "tiny:teacher-pairs"
CROSS = [f"model.teacher={TEACHER}", "teacher.cross_tokenizer=true"]


@pytest.fixture(scope="module")
def student_tok():
    return load_tokenizer("tiny:student")


@pytest.fixture(scope="module")
def teacher_tok():
    return load_tokenizer(TEACHER)


@pytest.fixture(scope="module")
def bridge(student_tok, teacher_tok):
    return TokenBridge(student_tok, teacher_tok, model_vocab_size(TEACHER))


def encode(tok, text, eos=True):
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []), np.int32)


def test_the_vocabularies_differ_and_the_run_says_how_to_distil_across_them(student_tok, teacher_tok):
    assert student_tok.get_vocab() != teacher_tok.get_vocab()
    assert len(teacher_tok("146", add_special_tokens=False)["input_ids"]) == 2
    with pytest.raises(ModelLoadError, match="set teacher.cross_tokenizer=true"):
        check_teacher_fits_student(load_config(None, [f"model.teacher={TEACHER}"]))
    assert check_teacher_fits_student(load_config(None, [*CROSS, "gkd.teacher_topk=64"])) == 320


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([*CROSS, "gkd.opd_coef=1", "gkd.teacher_topk=0", "gkd.distill_loss_coef=0"], "not with sampled-token"),
        ([*CROSS, "teacher.backend=openai"], "or a served teacher"),
    ],
)
def test_cross_tokenizer_misuse_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_each_student_token_is_anchored_in_the_teacher_token_that_covers_it(bridge, student_tok, teacher_tok):
    """'146' + EOS: the student's '1' starts the teacher's '14', its '4' lies inside it (after '1'), '6' starts
    the teacher's '6', and the end of sequence comes after all of the teacher's '6'."""
    teacher_ids, anchors = bridge.teacher_response(encode(student_tok, "146"))
    assert teacher_tok.convert_ids_to_tokens(teacher_ids.tolist()) == ["14", "6", teacher_tok.eos_token]
    assert [anchor[:4] for anchor in anchors] == [
        (0, "", False, 0),
        (0, "1", False, 0),
        (1, "", False, 0),
        (1, "6", True, 0),
    ]
    assert [anchor.token for anchor in anchors] == [*encode(student_tok, "146", eos=False).tolist(), -1]
    without_eos, anchors = bridge.teacher_response(encode(student_tok, "12", eos=False))
    assert teacher_tok.convert_ids_to_tokens(without_eos.tolist()) == ["12"] and [a[:4] for a in anchors] == [
        (0, "", False, 0),
        (0, "1", False, 0),
    ]


def test_a_student_token_inside_a_teacher_token_gets_the_teachers_next_character(bridge, student_tok, teacher_tok):
    """By hand: after '1', the teacher's '14' and '15' say '4' and '5' given a token beginning with '1' (its
    plain '1' token ends elsewhere: the tail); after all of '6', its '6' token passes its mass to the next row."""
    t = teacher_tok.convert_tokens_to_ids
    ids = np.array(
        [
            [t("14"), t("15"), t("1"), t("2")],
            [t("6"), t("60"), t("7"), t("8")],
            [teacher_tok.eos_token_id, t("1"), t("3"), t("4")],
        ]
    )
    probs = np.array([[0.5, 0.2, 0.1, 0.2], [0.6, 0.4, 0, 0], [0.9, 0.1, 0, 0]])
    _, anchors = bridge.teacher_response(encode(student_tok, "146"))
    with np.errstate(divide="ignore"):  # -inf: a teacher's top-k entry of probability 0
        mapped_ids, mapped = bridge.student_rows(ids, np.log(probs), anchors, 3)
    got = [
        {
            student_tok.convert_ids_to_tokens(int(i)): float(np.exp(lp))
            for i, lp in zip(r_ids, r, strict=True)
            if lp > -np.inf
        }
        for r_ids, r in zip(mapped_ids, mapped, strict=True)
    ]
    expected = [
        {"1": 0.8, "2": 0.2},
        {"4": 0.5 / 0.8, "5": 0.2 / 0.8},
        {"6": 1.0},
        {"<eos>": 0.6 * 0.9, "1": 0.6 * 0.1, "0": 0.4},
    ]
    for row, want in zip(got, expected, strict=True):
        assert row.keys() == want.keys() and all(row[c] == pytest.approx(p, rel=1e-5) for c, p in want.items())
    # The response's own '6' left out of its row's top-k: its probability (0.6) comes with the response's own
    # log-probs, so the end of sequence after it still gets the next row's mass (without them: the '60' alone).
    ids[1, 0] = t("9")
    response, _ = bridge.teacher_response(encode(student_tok, "146"))
    own = np.log([0.5, 0.6, 0.9])
    for sampled, want in ((own, expected[3]), (None, {"0": 1.0})):
        with np.errstate(divide="ignore"):
            mapped_ids, mapped = bridge.student_rows(ids, np.log(probs), anchors, 3, response, sampled)
        last = {
            student_tok.convert_ids_to_tokens(int(i)): float(np.exp(lp))
            for i, lp in zip(mapped_ids[3], mapped[3], strict=True)
            if lp > -np.inf
        }
        assert last.keys() == want.keys() and all(last[c] == pytest.approx(p, rel=1e-5) for c, p in want.items())


def test_the_prompt_goes_through_the_teachers_own_template(bridge, student_tok, teacher_tok, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "12+30="}], "answer": "42"}) + "\n")
    [prompt] = load_prompts([str(data)], student_tok, keep_source=True)
    ids = bridge.teacher_prompt(prompt.ids, prompt.extra)
    assert teacher_tok.decode(ids) == "user: 12+30=\nassistant: "
    assert teacher_tok.convert_ids_to_tokens(ids.tolist())[6:9] == ["12", "+", "30"]
    plain = bridge.teacher_prompt(prompt.ids, {PROMPT_FIELD: prompt_source("7+8=", None)})
    assert teacher_tok.decode(plain) == "user: 7+8=\nassistant: "
    # the reward function sees the data's fields, not gkd-async's own
    assert compute_reward(lambda p, r, **extra: float(len(extra)), "p", "r", prompt.extra) == 1.0


def test_the_teachers_template_gets_the_datas_chat_options(student_tok, teacher_tok, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "7+8="}) + "\n")
    with_system = load_prompts([str(data)], student_tok, PromptFormat(system_prompt="Add."), keep_source=True)
    bridge = TokenBridge(student_tok, teacher_tok, model_vocab_size(TEACHER))
    assert teacher_tok.decode(bridge.teacher_prompt(with_system[0].ids, with_system[0].extra)) == (
        "system: Add.\nuser: 7+8=\nassistant: "
    )
    raw = load_prompts([str(data)], student_tok, PromptFormat(apply_chat_template=False), keep_source=True)
    untemplated = TokenBridge(student_tok, teacher_tok, model_vocab_size(TEACHER), apply_chat_template=False)
    assert teacher_tok.decode(untemplated.teacher_prompt(raw[0].ids, raw[0].extra)) == "7+8="
    teacher_tok = teacher_tok.__class__.from_pretrained(teacher_tok.name_or_path)
    teacher_tok.chat_template = (
        "{{ messages[0]['content'] }}{% if enable_thinking is defined %}|{{ enable_thinking }}{% endif %}"
    )
    kwargs = TokenBridge(student_tok, teacher_tok, 10, chat_template_kwargs={"enable_thinking": False})
    assert teacher_tok.decode(kwargs.teacher_prompt(raw[0].ids, raw[0].extra)) == "7+8=|False"


def next_characters(full, teacher_tok, student_tok, row, prefix, ends):
    """Reference from the teacher's full distribution: student token (a character) -> probability, given the
    teacher's token at `row` begins with `prefix`."""
    out, given = {}, 0.0
    for token, logprob in enumerate(full[row][: len(teacher_tok)]):
        p = float(np.exp(logprob))
        if token == teacher_tok.eos_token_id:
            if not prefix:
                out[student_tok.eos_token_id] = out.get(student_tok.eos_token_id, 0.0) + p
                given += p
            continue
        text = teacher_tok.decode([token])
        if token in teacher_tok.all_special_ids or not text.startswith(prefix):
            continue
        given += p
        if len(text) > len(prefix):
            char = student_tok.convert_tokens_to_ids(text[len(prefix)])
            out[char] = out.get(char, 0.0) + p
        elif ends:
            for char, q in next_characters(full, teacher_tok, student_tok, row + 1, "", False).items():
                out[char] = out.get(char, 0.0) + p * q
    return {c: p / given for c, p in out.items()} if prefix else out


def test_mapped_rows_are_the_teachers_probability_of_each_next_character(bridge, student_tok, teacher_tok):
    """Against the teacher's full distribution, with characters for the student's tokens: at k = every row, the
    mapped rows are the teacher's probability of each next character."""
    model = load_model(TEACHER)
    engine = HFTeacherEngine(TEACHER, "float32", teacher_tok.pad_token_id)
    k = model_vocab_size(TEACHER)
    for prompt_text, answer in (("49+97=", "146"), ("3+4=", "7"), ("50+50=", "100")):
        prompt = bridge.teacher_prompt(np.zeros(1, np.int32), {PROMPT_FIELD: prompt_source(prompt_text, None)})
        response, anchors = bridge.teacher_response(encode(student_tok, answer))
        [(ids, lps)] = engine.score([(prompt, response)], k, 1.0, 1)
        mapped_ids, mapped = bridge.student_rows(ids, lps, anchors, k)
        full = full_logprobs(model, prompt, response)  # [R_teacher, V]
        for row, anchor in enumerate(anchors):
            expected = next_characters(full, teacher_tok, student_tok, *anchor[:3])
            present = mapped[row] > -np.inf
            got = dict(zip(mapped_ids[row][present].tolist(), np.exp(mapped[row][present]).tolist(), strict=True))
            assert len(set(mapped_ids[row].tolist())) == k  # distinct ids, the absent ones too
            assert got.keys() == expected.keys()
            for student_id, p in got.items():
                assert p == pytest.approx(expected[student_id], rel=1e-4)
            assert list(got.values()) == sorted(got.values(), reverse=True)


@pytest.mark.slow
def test_run_distils_across_tokenizers(ray_session, redis_server, redis_client, tmp_path, names):
    """`gkd-async run` with the pairs teacher: records carry the mapped rows and every sample is trained once
    (that it teaches is the demo's test, with a trained teacher: test_demo.py)."""
    cfg = load_config(
        None,
        small(tmp_path, "trainer.total_steps=10", "pipeline.mode=sync", "rollout.max_new_tokens=4", *CROSS,
              *joins(redis_server, names)),
    )  # fmt: skip
    observe(redis_client, names.scored)
    summary = run_pipeline(cfg)
    assert summary["step"] == 10
    ids = [sid for line in trained_log(summary["run_dir"]) for sid in line["sample_ids"]]
    assert len(ids) == len(set(ids)) == 10 * 2 * 2
    records = [decode_scored_record(f[b"d"]) for _, f in redis_client.xrange(names.scored)]
    assert all(r.token_logprobs is None and r.k == 32 for r in records)
    rows = np.concatenate([r.topk_logprobs for r in records]).astype(np.float64)
    # Rows with none: the untrained teacher's top-32 holds no token that goes on from inside its own token.
    assert np.isfinite(rows[:, 0]).mean() > 0.5  # measured: 0.82
    assert (np.exp(rows).sum(-1) <= 1 + 1e-4).all() and (~np.isfinite(rows)).any()  # fewer than k: absent
    metrics = read_metrics(Path(summary["run_dir"]))
    assert all("actor/teacher_reverse_kl" not in m for m in metrics)
    assert all(np.isfinite(m["actor/distill_loss"]) and m["actor/distill_loss"] >= 0 for m in metrics)


@pytest.mark.parametrize("branched", [False, True], ids=["undecided-to-the-tail", "undecided-continued"])
def test_a_student_token_spanning_teacher_tokens_gets_the_chain_of_their_probabilities(branched):
    """The other direction: a character-level teacher (tiny:teacher) and a BPE student (Qwen's tokenizer), whose
    tokens span several characters. By brute force from the teacher's own unpadded forward pass over each string:
    the student's token gets the probability that the text continues with its characters, P(c1) P(c2 | c1) ...
    (1e-4); and every student token the summed probability of the strings that leave that path (its first j
    characters, then another one, or the end), each counted for the student token it begins with, unless that
    token is the whole string and a longer student token begins with it too (then what follows decides): the
    student's own token split by the row after it; another string, with `branched` (every one scored, as
    teacher.cross_tokenizer_branches does for the likeliest), split by the teacher's forward pass over that
    string, else the tail. Each row given the student's tokens so far: a first character that would merge into
    the student's previous token is dropped and the rest renormalised. The end of sequence's row the same way,
    from the teacher's row after the whole text."""
    student_tok, teacher_tok = load_tokenizer("tiny:qwen-student"), load_tokenizer("tiny:teacher")
    bridge = TokenBridge(student_tok, teacher_tok, model_vocab_size("tiny:teacher"))
    engine = HFTeacherEngine("tiny:teacher", "float32", teacher_tok.pad_token_id)
    k, chars = engine.vocab_size, [t for t in range(len(teacher_tok)) if t not in teacher_tok.all_special_ids]
    prompt = encode(teacher_tok, "Say it: ", eos=False)
    plain = [t for t in range(len(student_tok)) if t not in student_tok.all_special_ids]
    longer = {text[:i] for text in student_tok.batch_decode([[t] for t in plain]) for i in range(1, len(text))}

    def decided(whole):  # the student token the string begins with, when the string decides it
        ids = student_tok(whole, add_special_tokens=False)["input_ids"]
        return None if len(ids) == 1 and whole in longer else ids[0]

    cuts = []  # per row: the mass of the continuations the student's tokenization rules out
    undecided = []  # at the end of sequence's rows: the strings whose student token what follows decides

    def merges(previous, char):  # the student's encoding of its previous token's text + char begins otherwise
        if previous is None or char == teacher_tok.eos_token_id:
            return False
        text = student_tok.decode([previous]) + teacher_tok.decode([char])
        return student_tok(text, add_special_tokens=False)["input_ids"][0] != previous

    for answer in ("hello world", "the cat sat"):
        student_ids = encode(student_tok, answer)
        response, anchors = bridge.teacher_response(student_ids)
        assert sum(anchor.chain > 0 for anchor in anchors) >= 2, anchors
        [(ids, lps, own)] = engine.score([(prompt, response)], k, 1.0, 1, sampled=True)
        branches = Branches()
        if branched:  # the strings that need their own row; the teacher scores one token further after each
            wanted = bridge.branch_requests(ids, lps, anchors, response, own, per_row=len(teacher_tok))
            assert len(wanted) > 10, wanted
            branches = Branches.scored(wanted, *engine.score_branches([(prompt, response)], [wanted], k, 1.0, 1)[0])
        mapped_ids, mapped = bridge.student_rows(ids, lps, anchors, 4096, response, own, branches)  # room for all
        full = full_logprobs(engine.model, prompt, response)  # [R_teacher, V], float64

        def split(expected, text, token, dist, p):  # the mass p of `text` by what follows: the student token it starts
            for after, q in enumerate(np.exp(dist).tolist()):
                if after == teacher_tok.eos_token_id or after not in chars:
                    merged = token if after == teacher_tok.eos_token_id else None
                else:
                    more = text + teacher_tok.decode([after])
                    head = student_tok(more, add_special_tokens=False)["input_ids"][0]
                    merged = token if head == token else decided(more)
                if merged is not None:
                    expected[merged] = expected.get(merged, 0.0) + p * q

        for row, (anchor, student_id) in enumerate(zip(anchors, student_ids.tolist(), strict=True)):
            if not anchor.chain:
                continue
            span = response[anchor.row : anchor.row + anchor.chain + 1]
            text = teacher_tok.decode(span)
            assert text == student_tok.decode([student_id])
            expected, path = {}, 0.0  # path: log P(the text so far)
            previous = student_ids[row - 1] if row else None  # the student's token before: what it never merges with
            conditioned, cut = not merges(previous, span[0]), 0.0
            for j, char in enumerate(span.tolist()):
                dist = full[anchor.row + j]
                for other in [*chars, teacher_tok.eos_token_id]:
                    if other == char and j < len(span) - 1:
                        continue
                    # not the student's tokenization of the text: given that tokenization, not there
                    if j == 0 and conditioned and merges(previous, other):
                        cut += float(np.exp(dist[other]))
                        continue
                    whole = text[:j] + ("" if other == teacher_tok.eos_token_id else teacher_tok.decode([other]))
                    first = student_tok.eos_token_id if not whole else decided(whole)
                    p = float(np.exp(path + dist[other]))
                    if other == teacher_tok.eos_token_id:  # the text ends: its first token, whatever could follow
                        end = student_tok(whole, add_special_tokens=False)["input_ids"][0] if whole else first
                        expected[end] = expected.get(end, 0.0) + p
                        continue
                    if other == char and text in longer:  # the path's own end, open: the row after says
                        split(expected, text, student_id, full[anchor.row + j + 1], p)
                        continue
                    if other != char and first is None and whole in longer and branched:  # undecided: its row
                        context = np.concatenate([response[: anchor.row + j], [other, other]]).astype(np.int32)
                        head = student_tok(whole, add_special_tokens=False)["input_ids"][0]
                        split(expected, whole, head, full_logprobs(engine.model, prompt, context)[-1], p)
                        continue
                    first = student_id if other == char else first  # the path's own end: the student's token
                    if first is not None:
                        expected[first] = expected.get(first, 0.0) + p
                path += dist[char]
            expected = {token: p / (1 - cut) for token, p in expected.items()}
            cuts.append(cut)
            present = mapped[row] > -np.inf
            got = dict(zip(mapped_ids[row][present].tolist(), np.exp(mapped[row][present]).tolist(), strict=True))
            own_chain = float(np.exp(sum(full[anchor.row + j, c] for j, c in enumerate(span.tolist())))) / (1 - cut)
            assert got[student_id] <= own_chain * (1 + 1e-4)  # the text continuing with its characters, at most
            assert (got[student_id] == pytest.approx(own_chain, rel=1e-4, abs=0)) == (text not in longer)
            top = sorted(expected, key=expected.get, reverse=True)[:4096]
            assert set(got) == {t for t in top if expected[t] > 0}
            for token, p in got.items():
                assert p == pytest.approx(expected[token], rel=1e-4, abs=0)

        # The end of sequence's row: what the teacher says follows the whole text, each string counted as above
        # (given the student's last token; an undecided one, such as " ", split by its own row when scored).
        expected, cut, previous = {}, 0.0, student_ids[-2]
        for other, p in enumerate(np.exp(full[-1]).tolist()):
            if other == teacher_tok.eos_token_id:
                expected[student_tok.eos_token_id] = expected.get(student_tok.eos_token_id, 0.0) + p
            elif other not in chars:
                continue
            elif merges(previous, other):
                cut += p
            elif (first := decided(whole := teacher_tok.decode([other]))) is not None:
                expected[first] = expected.get(first, 0.0) + p
            elif whole in longer:  # undecided
                undecided.append(p)
                if branched:
                    context = np.concatenate([response[:-1], [other, other]]).astype(np.int32)
                    head = student_tok(whole, add_special_tokens=False)["input_ids"][0]
                    split(expected, whole, head, full_logprobs(engine.model, prompt, context)[-1], p)
        present = mapped[-1] > -np.inf
        got = dict(zip(mapped_ids[-1][present].tolist(), np.exp(mapped[-1][present]).tolist(), strict=True))
        assert set(got) == {t for t, p in expected.items() if p > 0}
        for token, p in got.items():
            assert p == pytest.approx(expected[token] / (1 - cut), rel=1e-4, abs=0)
        cuts.append(cut)
    assert max(cuts) > 0.03, cuts  # rows given the student's tokens so far ("the" is never followed by "re")
    assert sum(undecided) > 0.05, undecided  # the end of sequence's row has strings its own row decides


@pytest.mark.parametrize("spec", ["tiny:teacher", "tiny:qwen-teacher"])
def test_the_teacher_scores_one_token_further_after_a_string_the_response_does_not_take(spec):
    """`score_branches`: the row after a token read in place of the response's own is the teacher's last row over
    prompt + response[:row] + that token, by its own unpadded forward pass (1e-5), from the HF teacher's tree pass
    (several branches of a sample in one sequence, samples of other lengths in one batch) and from the default
    every engine inherits (a sequence per branch, as the vLLM teacher scores them)."""
    engine = HFTeacherEngine(spec, "float32", load_tokenizer(spec).pad_token_id)
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(3, 60, p).astype(np.int32), rng.integers(3, 60, r).astype(np.int32)) for p, r in
             ((7, 9), (4, 5), (3, 3))]  # fmt: skip
    branches = [[(0, 11), (3, 5), (3, 6), (8, 40)], [(2, 7)], []]
    tree = engine.score_branches(pairs, branches, 8, 1.5, 2)
    each = TeacherEngine.score_branches(engine, pairs, branches, 8, 1.5, 2)
    for (prompt, response), wanted, *scored in zip(pairs, branches, tree, each, strict=True):
        for ids, lps in scored:
            assert ids.shape == lps.shape == (len(wanted), 8)
        for j, (row, token) in enumerate(wanted):
            context = np.concatenate([response[:row], [token, token]]).astype(np.int32)
            row_lps = full_logprobs(engine.model, prompt, context, temperature=1.5)[-1]
            best = np.argsort(-row_lps)[:8]
            for ids, lps in scored:
                assert ids[j].tolist() == best.tolist()
                np.testing.assert_allclose(lps[j], row_lps[best], atol=1e-5)


def test_a_student_tokens_last_character_outside_the_top_k_still_gives_it_its_chain():
    """The chain's last factor is the response token's own log-prob, not its top-k entry: with the teacher's top-1
    only, a student token whose characters the teacher does not rank first keeps P(c1) P(c2 | c1) ... (a top-k
    entry would give it nothing)."""
    student_tok, teacher_tok = load_tokenizer("tiny:qwen-student"), load_tokenizer("tiny:teacher")
    bridge = TokenBridge(student_tok, teacher_tok, model_vocab_size("tiny:teacher"))
    engine = HFTeacherEngine("tiny:teacher", "float32", teacher_tok.pad_token_id)
    prompt, student_ids = encode(teacher_tok, "Say it: ", eos=False), encode(student_tok, "hello world")
    response, anchors = bridge.teacher_response(student_ids)
    [(ids, lps, own)] = engine.score([(prompt, response)], 1, 1.0, 1, sampled=True)
    mapped_ids, mapped = bridge.student_rows(ids, lps, anchors, 8, response, own)
    full = full_logprobs(engine.model, prompt, response)
    checked = 0
    for row, anchor in enumerate(anchors):
        span = range(anchor.row, anchor.row + anchor.chain + 1)
        if anchor.token < 0 or student_tok.decode([anchor.token]) in bridge._extendable:
            continue  # its own end is split by what follows: not the chain alone
        if ids[span[-1], 0] == response[span[-1]]:
            continue  # the last character is the teacher's first choice: the top-1 holds it anyway
        got = dict(zip(mapped_ids[row].tolist(), np.exp(mapped[row]).tolist(), strict=True))
        chain = float(np.exp(sum(full[r, response[r]] for r in span)))
        assert got.get(anchor.token, 0.0) == pytest.approx(chain, rel=1e-4, abs=0)
        checked += 1
    assert checked >= 1


def test_the_scorer_scores_the_undecided_strings_one_token_further(redis_server, redis_client, names, tmp_path):
    """The teacher scorer's records (tiny:teacher, Qwen's BPE student): its rows are the mapping with the
    teacher's rows after the likeliest 4 undecided strings a row (teacher.cross_tokenizer_branches=4), which the
    scorer asked the engine for, and they hold mass that with 0 stays in the tail."""
    student_tok = load_tokenizer("tiny:qwen-student")
    student_ids = encode(student_tok, "the cat sat")
    prompt = encode(student_tok, "Say it: ", eos=False)
    rows = {}
    for per_row in (0, 4):
        run = StreamNames(f"{names.run_id}-{per_row}")
        cfg = load_config(
            None,
            small(tmp_path, "model.student=tiny:qwen-student", "model.teacher=tiny:teacher", "gkd.teacher_topk=16",
                  "teacher.cross_tokenizer=true", f"teacher.cross_tokenizer_branches={per_row}", "rollout.n=1",
                  f"pipeline.redis_url={redis_server.url}", f"pipeline.run_id={run.run_id}"),
        )  # fmt: skip
        scorer = TeacherScorer(RunContext(cfg, redis_server.url, run.run_id, tmp_path))
        record = RolloutRecord(
            run.run_id, "g0", ["s0"], 0, 0, prompt, student_ids, np.asarray([len(student_ids)], np.int32),
            np.zeros(len(student_ids), np.float32), extra={PROMPT_FIELD: prompt_source("Say it: ", None)},
        )  # fmt: skip
        redis_client.xadd(run.rollouts, {b"d": encode_rollout_record(record)})
        deadline = time.monotonic() + 10
        while not redis_client.xlen(run.scored) and not redis_client.xlen(run.dead) and time.monotonic() < deadline:
            scorer.step()
        assert not redis_client.xlen(run.dead), {
            k: v
            for _, f in redis_client.xrange(run.dead)
            for k, v in f.items()
            if k not in (b"d", b"payload_bytes", b"stream", b"id")
        }
        [(_, fields)] = redis_client.xrange(run.scored)
        scored = decode_scored_record(fields[b"d"])
        rows[per_row] = scored.topk_ids, scored.topk_logprobs
    bridge, engine = scorer.bridge, scorer.engine
    teacher_prompt = bridge.teacher_prompt(prompt, record.extra)
    response, anchors = bridge.teacher_response(student_ids)
    [(ids, lps, own)] = engine.score([(teacher_prompt, response)], 16, 1.0, 1, sampled=True)
    wanted = bridge.branch_requests(ids, lps, anchors, response, own, per_row=4)
    branches = Branches.scored(wanted, *engine.score_branches([(teacher_prompt, response)], [wanted], 16, 1.0, 1)[0])
    expected = bridge.student_rows(ids, lps, anchors, 16, response, own, branches)
    np.testing.assert_array_equal(rows[4][0], expected[0])
    np.testing.assert_allclose(rows[4][1], expected[1], rtol=1e-5)
    mass = {per_row: np.exp(rows[per_row][1].astype(np.float64)).sum(-1) for per_row in rows}
    assert (mass[4] >= mass[0] * (1 - 1e-6)).all() and (mass[4] > mass[0] * 1.02).any(), mass  # untrained: little
