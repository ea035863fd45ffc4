"""What a researcher brings, end to end through `gkd-async run`: models by Hub id (from an offline HF cache
laid out as `hf download` leaves it), Qwen's real 151,936-token vocabulary and chat template, a tied student,
top-256 teacher scoring, a parquet of verl rows and verl's own `compute_score`, a chat-template kwarg and a
LoRA student."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import lay_into_hf_cache
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gkd_async.train.metrics import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# verl's gsm8k scorer shape; it asserts the nested fields it is given, so a reward that did not get them fails
# every group and the run with it.
SCORER = """
import re

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    assert data_source == "openai/gsm8k", data_source
    assert extra_info["split"] == "train" and isinstance(extra_info["index"], int), extra_info
    assert ground_truth == str(sum(int(x) for x in extra_info["question"].split("+"))), (ground_truth, extra_info)
    match = re.search("#### (\\\\-?[0-9]+)", solution_str)
    return {"score": float(match is not None and match.group(1) == ground_truth)}
"""


def verl_rows(count=16):
    rows = []
    for i in range(count):
        question = f"{i}+{2 * i + 1}"
        rows.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": f"What is {question}? Answer after ####."}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(3 * i + 1)},
                "extra_info": {"split": "train", "index": i, "question": question},
            }
        )
    return rows


@pytest.fixture
def researcher_setup(tmp_path):
    home = tmp_path / "hf-home"
    lay_into_hf_cache(home, "acme/qwen3-student", "tiny:qwen-student")
    lay_into_hf_cache(home, "acme/qwen2.5-teacher", "tiny:qwen-teacher", revision="9" * 40)
    pq.write_table(pa.Table.from_pylist(verl_rows()), tmp_path / "train.parquet")
    (tmp_path / "gsm8k.py").write_text(SCORER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return tmp_path, env


def run(tmp_path, env, *overrides):
    args = [
        "model.student=acme/qwen3-student",
        f"model.teacher=acme/qwen2.5-teacher@{'9' * 40}",
        f"data.train_files=[{tmp_path / 'train.parquet'}]",
        "data.max_prompt_length=64",
        "data.chat_template_kwargs={enable_thinking: false}",
        f"custom_reward_function.path={tmp_path / 'gsm8k.py'}",
        "custom_reward_function.name=compute_score",
        "gkd.teacher_topk=256",
        "rollout.n=2",
        "rollout.max_new_tokens=8",
        "trainer.train_batch_size=2",
        "trainer.total_steps=2",
        "trainer.lr=1e-3",
        "pipeline.mode=sync",
        "logging.tensorboard=false",
        f"logging.dir={tmp_path / 'runs'}",
        *overrides,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def check_the_run(run_dir):
    metrics = read_metrics(run_dir)
    assert [m["training/global_step"] for m in metrics] == [1, 2]
    assert all("reward/mean" in m and m["actor/distill_loss"] > 0 for m in metrics)  # scored by verl's function
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert final.config.vocab_size == 151_936 and final.lm_head.weight is final.model.embed_tokens.weight
    saved = load_file(str(run_dir / "final" / "model.safetensors"))
    assert "lm_head.weight" not in saved  # the tie kept: saved once, as save_pretrained writes a tied model
    return final


@pytest.mark.parametrize("engines", ["hf-threads-lora", "vllm-ray"])
def test_a_hub_id_a_verl_parquet_and_the_real_vocabulary_train_end_to_end(researcher_setup, engines):
    tmp_path, env = researcher_setup
    if engines == "hf-threads-lora":
        overrides = ["pipeline.launcher=threads", "model.lora.rank=8", "model.lora.alpha=16"]
    else:
        overrides = ["rollout.backend=vllm", "teacher.backend=vllm", "vllm.kv_cache_memory_mb=64"]
    run_dir = run(tmp_path, env, *overrides)
    final = check_the_run(run_dir)
    snapshot = next((tmp_path / "hf-home" / "hub" / "models--acme--qwen3-student" / "snapshots").iterdir())
    initial = AutoModelForCausalLM.from_pretrained(snapshot)
    embedding, projection = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"
    trained = final.state_dict()
    if engines == "vllm-ray":
        assert not torch.equal(trained[embedding], initial.state_dict()[embedding])  # it trained
        return
    # LoRA: the base stayed frozen; final/ is the adapters merged, and final/adapter/ is PEFT's own adapter,
    # which PEFT loads onto the Hub snapshot and merges into the same model.
    from peft import PeftModel

    assert torch.equal(trained[embedding], initial.state_dict()[embedding])
    assert not torch.equal(trained[projection], initial.state_dict()[projection])
    merged = PeftModel.from_pretrained(initial, run_dir / "final" / "adapter").merge_and_unload().state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-6, rtol=0, msg=name)
    # and the last checkpoint (the adapters alone) exports to the same merged model
    exported = tmp_path / "exported"
    cli = [sys.executable, "-m", "cli.main", "export", str(run_dir), "--out", str(exported)]
    done = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "step_0000002" in done.stdout, done.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in trained.items())


def test_a_student_with_its_own_code_runs_only_with_model_trust_remote_code(tmp_path):
    """Every loader of the run (preflight, learner, rollout engine, tokenizer) honours the one key."""
    from test_models_data import model_with_its_own_code

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    student = model_with_its_own_code(tmp_path / "remote")
    args = [sys.executable, "-m", "cli.main", "run", f"model.student={student}", "pipeline.launcher=threads"]
    args += ["pipeline.mode=sync", "trainer.total_steps=2", "rollout.max_new_tokens=8", f"logging.dir={tmp_path / 'r'}"]
    refused = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "model.trust_remote_code=true" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    done = subprocess.run([*args, "model.trust_remote_code=true"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "r").iterdir()
    assert [m["training/global_step"] for m in read_metrics(run_dir)] == [1, 2]
