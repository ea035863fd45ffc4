"""Offline scoring: `gkd-async score` into a scored data set, and training from it (rollout.source=dataset)."""

import json
from pathlib import Path

import numpy as np
import pytest
from small_runs import joins, observe, small, trained_log

from gkd_async.config.loading import load_config
from gkd_async.data.pairs import Pair, load_pairs
from gkd_async.data.rows import DataError
from gkd_async.data.scored_dataset import (
    ROW_FIELD,
    ScoredDataset,
    ScoredDatasetError,
    ScoredRow,
    data_fingerprint,
    write_manifest,
    write_shard,
)
from gkd_async.data.tasks import task_rows
from gkd_async.engines.cross_tokenizer import PROMPT_FIELD, prompt_source
from gkd_async.engines.hf import HFTeacherEngine
from gkd_async.errors import ConfigError
from gkd_async.models.loading import load_tokenizer
from gkd_async.preflight.checks import preflight
from gkd_async.train.metrics import read_metrics
from gkd_async.transport.records import decode_scored_record
from workers.commands.score import score_dataset
from workers.launch.run import run_pipeline

K = 16


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:student")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def addition_data(path, count):
    return write_jsonl(path, [row | {"response": row["answer"]} for row in task_rows("addition", count=count)])


def test_pairs_from_prompt_and_response_or_chat_messages(tmp_path, tok):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "1+2=", "response": "3", "answer": "3"},
            {"messages": [{"role": "user", "content": "4+4="}, {"role": "assistant", "content": "8"}], "id": 7},
        ],
    )
    first, second = load_pairs([data], tok, max_response_length=8)
    assert tok.decode(first.response_ids) == "3" + tok.eos_token and first.extra == {"answer": "3"}
    prompt = tok.apply_chat_template([{"role": "user", "content": "4+4="}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(second.prompt_ids) == prompt and second.extra == {"id": 7}
    assert tok.decode(second.response_ids) == "8" + tok.eos_token
    # for a teacher of another tokenizer: the prompt's own source, without the response
    sourced = load_pairs([data], tok, max_response_length=8, keep_source=True)
    assert sourced[0].extra[PROMPT_FIELD] == prompt_source("1+2=", None)
    assert sourced[1].extra[PROMPT_FIELD] == prompt_source(None, [{"role": "user", "content": "4+4="}])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "1+2="}, "needs a string field 'response'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with the assistant's response"),
        ({"prompt": "1+2=", "response": "9" * 20}, "the response has 21 tokens .* rollout.max_new_tokens=8"),
    ],
)
def test_malformed_pairs_say_which_row_and_what_to_fix(tmp_path, tok, row, message):
    with pytest.raises(DataError, match=message):
        load_pairs([write_jsonl(tmp_path / "d.jsonl", [row])], tok, max_response_length=8)


def stored_rows(rng, count, k):
    rows = []
    for row in range(count):
        length = int(rng.integers(1, 6))
        rows.append(
            ScoredRow(
                row * 3, rng.integers(0, 300, int(rng.integers(2, 9))).astype(np.int32),
                rng.integers(0, 300, length).astype(np.int32), rng.integers(0, 300, (length, k)).astype(np.int32),
                -rng.random((length, k)).astype(np.float32), -rng.random(length).astype(np.float32), {"i": row},
            )
        )  # fmt: skip
    return rows


@pytest.mark.parametrize("k", [4, 0])
def test_shards_read_back_what_was_written(tmp_path, k):
    rows = stored_rows(np.random.default_rng(k), 7, k)
    files = [write_shard(tmp_path, 0, rows[:4], np.float32), write_shard(tmp_path, 1, rows[4:], np.float32)]
    manifest = {"format": "gkd-async scored dataset", "version": 1, "k": k, "temperature": 1.0, "teacher": "t"}
    write_manifest(tmp_path, manifest | {"complete": False, "data": {"rows": 7}, "shards": []})
    with pytest.raises(ScoredDatasetError, match="scored only in part .* run the same `gkd-async score"):
        ScoredDataset(tmp_path)
    write_manifest(tmp_path, manifest | {"complete": True, "data": {"rows": 7}, "shards": [{"file": f} for f in files]})
    dataset = ScoredDataset(tmp_path)
    assert dataset.rows() == [r.row for r in rows]
    for written in rows:
        read = dataset.read(written.row)
        for name in ("prompt_ids", "response_ids", "topk_ids", "topk_logprobs", "token_logprobs"):
            np.testing.assert_array_equal(getattr(read, name), getattr(written, name), err_msg=name)
        assert read.extra == written.extra
    prompts = dataset.prompts()
    assert [p.extra[ROW_FIELD] for p in prompts] == [r.row for r in rows]
    np.testing.assert_array_equal(prompts[2].ids, rows[2].prompt_ids)


def test_the_fingerprint_follows_the_token_ids():
    a = [Pair(np.array([1, 2], np.int32), np.array([3], np.int32))]
    b = [Pair(np.array([1], np.int32), np.array([2, 3], np.int32))]  # same ids, split elsewhere
    assert data_fingerprint(a) != data_fingerprint(b) and data_fingerprint(a) == data_fingerprint(list(a))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.source=dataset"], "set data.scored_dir"),
        (["data.scored_dir=x"], "is read only with rollout.source=dataset"),
        (["rollout.source=dataset", "data.scored_dir=x", "gkd.distill_loss_coef=0", "gkd.use_rl_loss=true"], "needs"),
        (["rollout.source=dataset", "data.scored_dir=x", "gkd.opd_coef=1"], "gkd.opd_coef=0"),
    ],
)
def test_dataset_source_misuse_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_scoring_a_data_set_with_the_teachers_hidden_states_is_refused(tmp_path):
    """A scored data set holds top-k log-probs; gkd.teacher_signal=hidden would store none: refused before any work."""
    from gkd_async.errors import GKDError

    cfg = load_config(None, ["gkd.teacher_signal=hidden"])
    with pytest.raises(GKDError, match="gkd.teacher_signal=hidden.*set gkd.teacher_signal=topk"):
        score_dataset(cfg, ["nothing.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_scored_data_set_says_how_to_make_one(tmp_path):
    cfg = load_config(None, ["rollout.source=dataset", f"data.scored_dir={tmp_path / 'nothing'}"])
    with pytest.raises(ScoredDatasetError, match="gkd-async score DATA.jsonl --out"):
        preflight(cfg)


@pytest.mark.slow
def test_score_resumes_after_an_interruption_and_matches_the_teacher(ray_session, redis_server, tmp_path, tok):
    """Two scorers through the streams; interrupted after its first shard, the same command finishes the rest
    without scoring the first shard again; every row is stored once, with the HF teacher's own top-k."""
    data = addition_data(tmp_path / "data.jsonl", 40)
    out = tmp_path / "scored"
    cfg = load_config(
        None, [f"gkd.teacher_topk={K}", "pipeline.num_teacher_scorers=2", f"pipeline.redis_url={redis_server.url}"]
    )

    def interrupt_after_a_shard(done, total):
        if (out / "shard-00000.safetensors").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_dataset(cfg, [data], out, shard_size=16, on_progress=interrupt_after_a_shard)
    first = (out / "shard-00000.safetensors").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["scored_rows"] == 16
    summary = score_dataset(cfg, [data], out, shard_size=16)
    assert summary == {"out_dir": str(out), "rows": 40, "scored_rows": 40, "failed_rows": 0, "shards": 3}
    assert (out / "shard-00000.safetensors").read_bytes() == first  # not scored again
    assert [shard["rows"] for shard in json.loads((out / "manifest.json").read_text())["shards"]] == [16, 16, 8]
    dataset = ScoredDataset(out)
    assert dataset.rows() == list(range(40))
    pairs = load_pairs([data], tok, max_response_length=cfg.rollout.max_new_tokens)
    teacher = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id)
    expected = teacher.score([(p.prompt_ids, p.response_ids) for p in pairs], K, 1.0, 8, sampled=True)
    for row, (ids, lps, tokens) in enumerate(expected):
        stored = dataset.read(row)
        np.testing.assert_array_equal(stored.response_ids, pairs[row].response_ids)
        np.testing.assert_allclose(stored.topk_logprobs, lps, atol=1e-5)
        np.testing.assert_allclose(stored.token_logprobs, tokens, atol=1e-5)
        assert (stored.topk_ids == ids).mean() > 0.95  # ids may swap between near-equal log-probs
    other = load_config(None, ["gkd.teacher_topk=8", f"pipeline.redis_url={redis_server.url}"])
    with pytest.raises(ScoredDatasetError, match="scored with other settings or data .*k 16 -> 8"):
        score_dataset(other, [data], out)


@pytest.mark.slow
def test_run_trains_from_the_scored_data_set_with_no_teacher(ray_session, redis_server, redis_client, tmp_path, names):
    """rollout.source=dataset: each admitted prompt's stored response and scores reach the learner as they were
    stored, no teacher scorer runs, every sample is trained once, and the distillation loss falls."""
    out = tmp_path / "scored"
    score_dataset(load_config(None, [f"gkd.teacher_topk={K}"]), [addition_data(tmp_path / "d.jsonl", 24)], out, 8)
    cfg = load_config(
        None,
        small(
            tmp_path,
            "rollout.source=dataset",
            f"data.scored_dir={out}",
            f"gkd.teacher_topk={K}",
            "trainer.total_steps=24",
            "trainer.train_batch_size=4",
            "trainer.lr=1e-2",
            *joins(redis_server, names),
        ),
    )
    observe(redis_client, names.scored)
    summary = run_pipeline(cfg)
    assert summary["step"] == 24
    ids = [sid for line in trained_log(summary["run_dir"]) for sid in line["sample_ids"]]
    assert len(ids) == len(set(ids)) == 24 * 4
    dataset = ScoredDataset(out)
    records = [decode_scored_record(f[b"d"]) for _, f in redis_client.xrange(names.scored)]
    assert {r.rollout.extra[ROW_FIELD] for r in records} == set(range(24))  # four epochs over 24 rows
    for record in records:
        stored = dataset.read(record.rollout.extra[ROW_FIELD])
        np.testing.assert_array_equal(record.rollout.response_ids, stored.response_ids)
        np.testing.assert_array_equal(record.topk_logprobs, stored.topk_logprobs)
    assert not redis_client.exists(names.rollouts)  # nothing was generated or scored in this run
    losses = [m["actor/distill_loss"] for m in read_metrics(Path(summary["run_dir"]))]
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
