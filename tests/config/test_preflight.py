"""Checks before any server starts: sizes, lengths and files, each a clear error; and a teacher whose
output layer is padded past the student's is scored over the rows both have."""

import json

import numpy as np
import pytest
import torch

from gkd_async.config.loading import for_teacher, load_config
from gkd_async.engines.hf import HFTeacherEngine
from gkd_async.errors import ConfigError
from gkd_async.models.loading import load_model, load_tokenizer, model_vocab_size
from gkd_async.preflight.checks import check_teacher_fits_student, preflight
from gkd_async.train.checkpoint import prune_checkpoints


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory):
    """tiny:teacher with 64 more output rows, as Qwen2.5 7B is padded past 0.5B (152,064 vs 151,936)."""
    path = tmp_path_factory.mktemp("padded-teacher")
    model = load_model("tiny:teacher")
    model.resize_token_embeddings(model_vocab_size("tiny:teacher") + 64, mean_resizing=False)
    with torch.no_grad():  # make the padded rows attractive, so that a scorer that used them would show it
        model.lm_head.weight[-64:] = model.lm_head.weight[:64] * 3
    model.save_pretrained(path)
    load_tokenizer("tiny:teacher").save_pretrained(path)
    return path


def test_a_padded_teacher_is_scored_over_the_shared_rows(padded_teacher):
    student_rows = model_vocab_size("tiny:student")
    cfg = load_config(None, [f"model.teacher={padded_teacher}", "gkd.teacher_topk=16"])
    assert check_teacher_fits_student(cfg) == student_rows
    tok = load_tokenizer("tiny:student")
    engine = HFTeacherEngine(str(padded_teacher), "float32", tok.pad_token_id)
    prompt, response = np.array(tok("12+30=")["input_ids"], np.int32), np.array(tok("42")["input_ids"], np.int32)
    [(ids, logprobs)] = engine.score([(prompt, response)], 16, 1.0, 1, vocab_limit=student_rows)
    assert ids.max() < student_rows
    [(unlimited, _)] = engine.score([(prompt, response)], 16, 1.0, 1)
    assert unlimited.max() >= student_rows  # the padded rows would have been scored as tokens
    with torch.no_grad():
        full = engine.model(input_ids=torch.as_tensor(np.concatenate([prompt, response]))[None].long()).logits[0]
    rows = full[len(prompt) - 1 : len(prompt) - 1 + len(response), :student_rows].double()
    expected = torch.log_softmax(rows, -1).topk(16, -1)
    np.testing.assert_allclose(logprobs, expected.values.numpy(), atol=1e-5)


def test_a_padded_teacher_on_vllm_is_refused_naming_both_sizes(padded_teacher):
    cfg = load_config(None, [f"model.teacher={padded_teacher}", "teacher.backend=vllm"])
    rows = model_vocab_size("tiny:student")
    with pytest.raises(ConfigError, match=f"teacher's output layer has {rows + 64} rows and the student's {rows}"):
        check_teacher_fits_student(cfg)


def test_context_lengths_data_and_reward_are_checked_first(tmp_path):
    with pytest.raises(ConfigError, match="more than the student model 'tiny:student' takes"):
        preflight(load_config(None, ["data.max_prompt_length=1000", "rollout.max_new_tokens=100"]))
    with pytest.raises(Exception, match="missing.jsonl"):
        preflight(load_config(None, [f"data.train_files=[{tmp_path / 'missing.jsonl'}]"]))
    with pytest.raises(Exception, match="custom_reward_function.path"):
        preflight(load_config(None, [f"custom_reward_function.path={tmp_path / 'nope.py'}"]))
    preflight(load_config(None, []))  # the embedded default passes


def test_old_checkpoints_are_pruned_and_rolled_back_ones_removed(tmp_path):
    for step in (10, 20, 30, 40):
        (tmp_path / f"step_{step:07d}").mkdir()
    removed = prune_checkpoints(tmp_path, keep_last=2, current=tmp_path / "step_0000020")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000010", "step_0000020"]
    assert sorted(p.name for p in removed) == ["step_0000030", "step_0000040"]


def routed_data(tmp_path, domains):
    path = tmp_path / "routed.jsonl"
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} | ({"domain": d} if d else {}) for i, d in enumerate(domains)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TEACHERS = ["model.teachers.math=tiny:teacher", "model.teachers.chat=tiny:student", "data.teacher_key=domain"]


def test_a_prompt_routed_to_no_teacher_is_a_clear_error_at_start(tmp_path):
    data = routed_data(tmp_path, ["math", "chat", "poetry", "poetry", None, "math"])
    with pytest.raises(ConfigError) as err:
        preflight(load_config(None, [f"data.train_files=[{data}]", *TEACHERS]))
    message = str(err.value)
    assert "routes 3 of 6 prompts to no teacher of model.teachers (chat, math)" in message
    assert "'poetry' (2 prompts)" in message and "no 'domain' field (1 prompt)" in message
    preflight(load_config(None, [f"data.train_files=[{routed_data(tmp_path, ['math', 'chat'])}]", *TEACHERS]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.teachers.math=tiny:teacher"], "need both model.teachers .* and data.teacher_key"),
        (["data.teacher_key=domain"], "need both model.teachers"),
        (["model.teachers.a:b=tiny:teacher", "data.teacher_key=d"], r"\['a:b'\] are not plain names"),
        ([*TEACHERS, "rollout.source=teacher"], "supervised KD samples from model.teacher alone"),
        ([*TEACHERS, "gkd.enable_teacher=false", "gkd.use_rl_loss=true"], "gkd.enable_teacher=false"),
    ],
)
def test_misused_teachers_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_each_teachers_scorers_see_their_own_model():
    cfg = load_config(None, [*TEACHERS, "teacher.backend=openai"])
    assert for_teacher(cfg, "chat").model.teacher == "tiny:student"
    assert for_teacher(cfg, "chat").teacher.openai.model == "tiny:student"  # the served model's name
    assert cfg.model.teacher == "tiny:teacher" and cfg.teacher.openai.model is None  # the run's own is untouched
    with pytest.raises(ConfigError, match=r"no teacher named 'code': model.teachers has \['chat', 'math'\]"):
        for_teacher(cfg, "code")
