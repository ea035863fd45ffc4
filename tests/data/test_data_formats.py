"""The data researchers already have: parquet, JSON, directories, globs, `datasets` save_to_disk and Hub ids;
verl's and TRL's rows with every field (nested ones too) reaching the reward; a verl `compute_score` unchanged;
overlong and empty prompts; chat-template options. Each format is read against the same rows written as JSONL."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gkd_async.config.loading import load_config
from gkd_async.config.model_data import DataSection
from gkd_async.data.pairs import load_pairs
from gkd_async.data.prompts import PromptFormat, load_prompts
from gkd_async.data.rows import DataError
from gkd_async.models.loading import load_tokenizer
from gkd_async.rewards.loading import RewardError, check_reward_takes_fields, compute_reward, load_reward_function
from gkd_async.transport.records import PromptRecord, decode_prompt_record, encode_prompt_record

# Rows as verl's GSM8K preprocessing writes them.
VERL_ROWS = [
    {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{a}+{b}= Let's think step by step."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(a + b)},
        "extra_info": {"split": "train", "index": i, "answer": f"#### {a + b}"},
    }
    for i, (a, b) in enumerate([(1, 2), (30, 4), (7, 8), (12, 13)])
]

# A verl reward module, written as verl's gsm8k scorer is: the number after "####" against the ground truth.
VERL_SCORER = """
import re

def compute_score(data_source, solution_str, ground_truth, extra_info=None, method="strict", format_score=0.0):
    assert data_source == "openai/gsm8k" and extra_info["split"] == "train"
    match = re.search("#### (\\\\-?[0-9\\\\.\\\\,]+)", solution_str)
    if match is None:
        return 0.0
    return {"score": 1.0 if match.group(1) == ground_truth else format_score, "acc": True}
"""


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:student")


def as_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def as_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write(path, text):
    path.write_text(text)
    return str(path)


def same_prompts(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x.ids, y.ids) and x.extra == y.extra for x, y in zip(a, b, strict=True)
    )


def test_verl_rows_template_their_messages_and_keep_every_field(tmp_path, tok):
    prompts = load_prompts([as_parquet(tmp_path / "train.parquet", VERL_ROWS)], tok)
    expected = tok.apply_chat_template(VERL_ROWS[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(prompts[1].ids) == expected == "user: 30+4= Let's think step by step.\nassistant: "
    assert prompts[1].extra == {k: v for k, v in VERL_ROWS[1].items() if k != "prompt"}
    # nested fields travel in the prompt record to the rollout worker's reward call
    record = PromptRecord("run", "0:1", 1, 0, prompts[1].ids, prompts[1].extra)
    assert decode_prompt_record(encode_prompt_record(record)).extra["reward_model"]["ground_truth"] == "34"


def test_every_format_reads_the_same_rows(tmp_path, tok, monkeypatch):
    import datasets

    reference = load_prompts([as_jsonl(tmp_path / "rows.jsonl", VERL_ROWS)], tok)
    (tmp_path / "rows.json").write_text(json.dumps(VERL_ROWS))
    parts = tmp_path / "parts"
    parts.mkdir()
    as_parquet(parts / "train-00000.parquet", VERL_ROWS[:2])
    as_jsonl(parts / "train-00001.jsonl", VERL_ROWS[2:])
    datasets.Dataset.from_list(VERL_ROWS).save_to_disk(str(tmp_path / "saved"))
    hub = tmp_path / "hf" / "hub" / "datasets--acme--gsm8k-verl"  # a Hub dataset as `hf download` caches it
    shutil.copytree(parts, hub / "snapshots" / ("c" * 40) / "data")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    sources = {
        "json": [str(tmp_path / "rows.json")],
        "parquet": [as_parquet(tmp_path / "rows.parquet", VERL_ROWS)],
        "directory": [str(parts)],
        "glob": [str(parts / "train-*")],
        "save_to_disk": [str(tmp_path / "saved")],
        "hub id": ["acme/gsm8k-verl"],
        "hub id and split": ["acme/gsm8k-verl:train"],
    }
    for name, files in sources.items():
        assert same_prompts(load_prompts(files, tok), reference), name
    with pytest.raises(DataError, match=r"no data file of split 'test'"):
        load_prompts(["acme/gsm8k-verl:test"], tok)
    with pytest.raises(DataError) as missing:
        load_prompts(["acme/other"], tok)
    assert "`hf download acme/other --repo-type dataset`" in str(missing.value) and "\n" not in str(missing.value)


def test_a_parquet_of_long_rows_is_read_in_batches_in_order(tmp_path, tok):
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(10_000)]
    prompts = load_prompts([as_parquet(tmp_path / "big.parquet", rows)], tok)
    assert [p.extra["answer"] for p in prompts] == [r["answer"] for r in rows]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # the seed's failure: a parquet file under a JSONL name ended in a UnicodeDecodeError traceback
        (lambda d: (as_parquet(d / "x.parquet", VERL_ROWS), shutil.move(d / "x.parquet", d / "d.jsonl"))[1],
         "d.jsonl:1: not UTF-8 text: is it a JSONL file?"),
        (lambda d: write(d / "d.csv", "prompt\n1+1=\n"), "is not a format gkd-async reads (.csv)"),
        (lambda d: write(d / "d.parquet", "{}"), "d.parquet: not a readable parquet file"),
        (lambda d: as_parquet(d / "d.parquet", [{"question": "1+1="}] * 2), "d.parquet row 0: needs a field 'prompt'"),
        (lambda d: as_parquet(d / "d.parquet", [*VERL_ROWS[:3], {**VERL_ROWS[3], "prompt": [{"role": "user"}]}]),
         "d.parquet row 3: 'prompt' must be a non-empty list of {'role': str, 'content': str}"),
        (lambda d: as_parquet(d / "d.parquet", [{**VERL_ROWS[0], "prompt": []}]), "d.parquet row 0: 'prompt' must be"),
        (lambda d: write(d / "d.json", '{"prompt": "x"}'), "d.json: a JSON object"),
        (lambda d: str(d / "no-*.parquet"), "matches no file"),
        (lambda d: "data/train.jsonl", "data file data/train.jsonl does not exist"),  # a path, not a Hub id
    ],
)  # fmt: skip
def test_bad_data_is_one_line_naming_file_row_and_field(tmp_path, tok, make, message):
    with pytest.raises(DataError) as err:
        load_prompts([str(make(tmp_path))], tok)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overlong_prompts_are_dropped_and_counted_or_refused_naming_the_row(tmp_path, tok):
    rows = [{"prompt": "1+1="}, {"prompt": "9" * 40}, {"prompt": "2+2="}, {"prompt": "8" * 50}]
    path = as_jsonl(tmp_path / "d.jsonl", rows)
    said = []
    kept = load_prompts([path], tok, PromptFormat(max_prompt_length=30, filter_overlong=True), report=said.append)
    assert [tok.decode(p.ids) for p in kept] == ["user: 1+1=\nassistant: ", "user: 2+2=\nassistant: "]
    assert said == [
        "dropped 2 of 4 prompts over 30 tokens (data.max_prompt_length; data.filter_overlong_prompts=false "
        "refuses them instead)"
    ]
    with pytest.raises(DataError, match=r"d.jsonl:2: the prompt has 58 tokens, more than data.max_prompt_length=30"):
        load_prompts([path], tok, PromptFormat(max_prompt_length=30, filter_overlong=False))
    with pytest.raises(DataError, match="all 2 are over data.max_prompt_length=5"):
        load_prompts([as_jsonl(tmp_path / "long.jsonl", rows[1::2])], tok, PromptFormat(max_prompt_length=5))
    cfg = load_config(None, ["data.max_prompt_length=30"])  # the config's default is to drop them, as verl's
    assert cfg.data.filter_overlong_prompts and len(load_prompts([path], tok, cfg.data)) == 2


def test_prompts_tokenized_in_batches_are_each_rows_own_tokens(tmp_path, monkeypatch):
    """Qwen's real tokenizer and template: rows tokenized a batch at a time (3 here, across batch ends, an
    overlong row dropped in the middle) get exactly `tokenizer(text)`'s ids, in row order; so does a slow
    tokenizer's one-at-a-time path."""
    import gkd_async.data.prompts as data

    qwen = load_tokenizer("tiny:qwen-student")
    texts = ["Hello world", "", "<|im_start|>user\nnaïve 東京 🙂<|im_end|>\n", "  spaced\tout  ", "x" * 300]
    assert data.encode_texts(qwen, texts) == [qwen(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert data.encode_texts(qwen, ["Hello world"]) == [[9707, 1879]]
    monkeypatch.setattr(data, "ENCODE_BATCH_ROWS", 3)
    rows = [{"prompt": f"What is {i} plus {i * 7}? Café {i}"} for i in range(10)]
    rows[4] = {"prompt": "long " * 200}
    fmt = PromptFormat(max_prompt_length=64)
    said = []
    prompts = load_prompts([as_jsonl(tmp_path / "d.jsonl", rows)], qwen, fmt, report=said.append)
    expected = [
        qwen(qwen.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for i, row in enumerate(rows) if i != 4
    ]  # fmt: skip
    assert [p.ids.tolist() for p in prompts] == expected and said[0].startswith("dropped 1 of 10")

    class Slow:  # a tokenizer without a Rust backend
        is_fast = False

        def __call__(self, text, add_special_tokens):
            return {"input_ids": qwen(text, add_special_tokens=add_special_tokens)["input_ids"]}

    assert data.encode_texts(Slow(), texts) == data.encode_texts(qwen, texts)


def test_worker_processes_tokenize_as_this_process_does(tmp_path, tok, monkeypatch):
    """data.tokenize_workers=2 with the pool starting after the first batch: the same prompts in the same
    order, the same count of dropped ones, and a bad row in a worker's batch is the same one-line error."""
    import gkd_async.data.prompts as data

    monkeypatch.setattr(data, "ENCODE_BATCH_ROWS", 4)
    monkeypatch.setattr(data, "POOL_AFTER_ROWS", 4)
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(30)]
    rows[13] = {"prompt": "9" * 60}
    path = as_jsonl(tmp_path / "d.jsonl", rows)
    said = []

    def load(workers, cache):
        monkeypatch.setenv("GKD_ASYNC_CACHE", str(tmp_path / cache))  # each load tokenizes
        return load_prompts(
            [path], tok, DataSection(max_prompt_length=40, tokenize_workers=workers), report=said.append
        )

    alone, pooled = load(0, "a"), load(2, "b")
    assert len(alone) == 29 and same_prompts(alone, pooled) and said[0] == said[1]
    rows[21] = {"prompt": ""}
    path = as_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"^[^\n]*d.jsonl:22: the prompt is empty[^\n]*$"):
        load(2, "c")


def test_chat_template_options(tmp_path, tok):
    thinking = tok.__class__.from_pretrained(tok.name_or_path)
    thinking.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% if enable_thinking is defined and not enable_thinking %}"
        "<think></think>{% endif %}{% endif %}"
    )
    path = as_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2="}])

    def text(tokenizer, **options):
        cfg = load_config(None, [f"data.{k}={json.dumps(v)}" for k, v in options.items()])
        [prompt] = load_prompts([path], tokenizer, cfg.data)
        return tokenizer.decode(prompt.ids)

    assert text(thinking) == "user: 1+2=\nassistant: "
    assert text(thinking, chat_template_kwargs={"enable_thinking": False}) == "user: 1+2=\nassistant: <think></think>"
    assert text(tok, system_prompt="Add.") == "system: Add.\nuser: 1+2=\nassistant: "
    assert text(tok, apply_chat_template=False) == "1+2="  # the string as it is, no template


def test_trl_completions_are_the_responses_of_offline_scoring(tmp_path, tok):
    rows = [
        {"prompt": [{"role": "user", "content": "1+2="}], "completion": [{"role": "assistant", "content": "3"}]},
        {"prompt": "4+4=", "completion": "8"},
    ]
    first, second = load_pairs([as_jsonl(tmp_path / "d.jsonl", rows)], tok, max_response_length=8)
    assert tok.decode(first.prompt_ids) == "user: 1+2=\nassistant: " and tok.decode(first.response_ids) == "3<eos>"
    assert tok.decode(second.response_ids) == "8<eos>" and "completion" not in second.extra


def test_a_verl_compute_score_works_unchanged(tmp_path, tok):
    (tmp_path / "gsm8k.py").write_text(VERL_SCORER)
    fn = load_reward_function(str(tmp_path / "gsm8k.py"), "compute_score")
    prompts = load_prompts([as_parquet(tmp_path / "train.parquet", VERL_ROWS)], tok)
    check_reward_takes_fields(fn, [p.extra for p in prompts])
    extra = prompts[1].extra
    assert compute_reward(fn, "30+4=", "30 plus 4 is 34.\n#### 34", extra) == 1.0
    assert compute_reward(fn, "30+4=", "#### 35", extra) == 0.0
    assert compute_reward(fn, "30+4=", "no answer", extra) == 0.0
    with pytest.raises(RewardError, match="neither reward_model.ground_truth nor ground_truth"):
        check_reward_takes_fields(fn, [{"data_source": "openai/gsm8k"}])


def test_tokenized_prompts_are_kept_for_the_next_load_until_data_tokenizer_or_options_change(
    tmp_path, tok, monkeypatch
):
    import gkd_async.data.prompts as data_module

    monkeypatch.setenv("GKD_ASYNC_CACHE", str(tmp_path / "cache"))
    FMT = PromptFormat(max_prompt_length=49)  # noqa: N806  (drops one of the four rows)
    path = as_parquet(tmp_path / "train.parquet", VERL_ROWS)
    first = load_prompts([path], tok, FMT, report=(said := []).append)
    real_tokenize = data_module._prompt_text

    def refuse(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "_prompt_text", refuse)
    again = load_prompts([path], tok, FMT, report=said.append)
    assert len(first) == 3 and said[0].startswith("dropped 1 of 4 prompts over 49 tokens")
    assert same_prompts(first, again) and said[0] == said[1]  # the same prompts, the same count of dropped ones
    changed = {
        "options": lambda: load_prompts([path], tok, PromptFormat(max_prompt_length=50)),
        "source kept": lambda: load_prompts([path], tok, FMT, keep_source=True),
        "template": lambda: load_prompts([path], load_tokenizer("tiny:teacher-pairs"), FMT),
        "data": lambda: load_prompts([as_parquet(tmp_path / "train.parquet", VERL_ROWS[:3])], tok, FMT),
    }
    for what, load in changed.items():
        with pytest.raises(AssertionError, match="tokenized again"):
            load()
        assert what
    monkeypatch.setattr(data_module, "_prompt_text", real_tokenize)
    (entry,) = (tmp_path / "cache" / "prompts").glob("*.npz")  # options of the refused loads wrote nothing
    entry.write_bytes(b"not an npz")  # a damaged entry is tokenized anew, not trusted
    assert same_prompts(load_prompts([as_parquet(tmp_path / "train.parquet", VERL_ROWS)], tok, FMT), first)


def test_a_hub_dataset_is_kept_by_its_snapshot_and_split(tmp_path, tok, monkeypatch):
    import gkd_async.data.prompts as data_module

    monkeypatch.setenv("GKD_ASYNC_CACHE", str(tmp_path / "cache"))
    snapshot = tmp_path / "hf" / "hub" / "datasets--acme--gsm8k-verl" / "snapshots" / ("d" * 40)
    snapshot.mkdir(parents=True)
    as_parquet(snapshot / "train.parquet", VERL_ROWS)
    as_parquet(snapshot / "test.parquet", VERL_ROWS[:2])
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("d" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    first = load_prompts(["acme/gsm8k-verl"], tok)
    real_tokenize = data_module._prompt_text

    def refuse(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "_prompt_text", refuse)
    assert same_prompts(load_prompts(["acme/gsm8k-verl"], tok), first)  # the second run: from the cache
    with pytest.raises(AssertionError, match="tokenized again"):  # another split is other prompts
        load_prompts(["acme/gsm8k-verl:test"], tok)
    monkeypatch.setattr(data_module, "_prompt_text", real_tokenize)
    assert len(load_prompts(["acme/gsm8k-verl:test"], tok)) == 2
