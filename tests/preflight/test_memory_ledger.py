"""The memory ledger (gkd_async.preflight.memory): its counts against independent ones (the closed-form parameter
count of a Qwen2 model, the bytes a real AdamW step leaves), its one process under pipeline.launcher=threads, the
refusal of a run that cannot fit, and the peaks the stages report back (transport.streams.ProcessMemory)."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config

from gkd_async.config.loading import load_config
from gkd_async.errors import ConfigError
from gkd_async.models.loading import QWEN_VOCAB_SIZE, resolve_model_path
from gkd_async.models.lora import load_trainable_student
from gkd_async.preflight.memory import (
    PROCESS_BASE_BYTES,
    ModelShape,
    RunShape,
    check_fits,
    compare_with_measured,
    predict_memory,
)
from gkd_async.transport.streams import ProcessMemory

REPO = Path(__file__).resolve().parents[2]
# Qwen2.5-0.5B's and -1.5B's published configs: hidden, layers, heads, KV heads, MLP width
QWEN25 = {"0.5b": (896, 24, 14, 2, 4864), "1.5b": (1536, 28, 12, 2, 8960)}


def qwen2_config_dir(tmp_path, name, tied=True):
    hidden, layers, heads, kv_heads, mlp = QWEN25[name]
    config = Qwen2Config(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, tie_word_embeddings=tied,
    )  # fmt: skip
    path = tmp_path / name
    config.save_pretrained(path)  # the config alone: the ledger reads no weights
    return path, (hidden, layers, heads, kv_heads, mlp)


def qwen2_parameters(hidden, layers, heads, kv_heads, mlp, vocab=QWEN_VOCAB_SIZE, tied=True):
    """Closed form: embedding (and an untied head), per layer q/k/v with biases, o, the MLP's three matrices and
    two norms, and the final norm."""
    kv = kv_heads * (hidden // heads)
    per_layer = hidden * (hidden + 2 * kv) + (hidden + 2 * kv) + hidden * hidden + 3 * hidden * mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.mark.parametrize("name,tied", [("0.5b", True), ("1.5b", True), ("0.5b", False)])
def test_the_ledger_counts_a_real_shapes_parameters_as_the_closed_form_does(tmp_path, name, tied):
    path, dims = qwen2_config_dir(tmp_path, name, tied)
    shape = ModelShape.of(str(path))
    assert shape.params == qwen2_parameters(*dims, tied=tied)
    if name == "0.5b" and tied:
        assert shape.params == 494_032_768  # Qwen2.5-0.5B's 0.49B parameters
    assert shape.trainable == shape.params and shape.vocab == QWEN_VOCAB_SIZE
    assert shape.kv_cache_per_token == 2 * dims[1] * dims[3] * (dims[0] // dims[2])


def test_the_learners_held_bytes_are_what_a_real_adamw_step_leaves(tmp_path):
    """Weights, gradients and AdamW's two moments of the tied real-vocabulary student after one real step, counted
    from the tensors themselves (a tied weight once), against the ledger's 16 B a trained parameter; with LoRA,
    the gradients and moments of the adapters only."""
    for overrides in ([], ["model.lora.rank=4"]):
        cfg = load_config(None, ["model.student=tiny:qwen-student", "model.teacher=tiny:qwen-teacher", *overrides])
        model = load_trainable_student(cfg.model)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained)
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        optimizer.step()
        tensors = {t.data_ptr(): t for t in model.parameters()}
        tensors |= {p.grad.data_ptr(): p.grad for p in trained}
        for state in optimizer.state.values():
            tensors |= {t.data_ptr(): t for t in state.values() if t.dim() > 0}
        counted = sum(t.numel() * t.element_size() for t in tensors.values())
        (learner,) = [p for p in predict_memory(cfg).processes if p.name == "learner rank"]
        assert learner.held_bytes - PROCESS_BASE_BYTES == counted


def test_under_threads_the_ledger_is_one_process_holding_every_stage():
    common = ["model.student=tiny:qwen-student", "model.teacher=tiny:qwen-teacher", "pipeline.num_teacher_scorers=2"]
    ray = predict_memory(load_config(None, common), RunShape(40))
    threads = predict_memory(load_config(None, [*common, "pipeline.launcher=threads"]), RunShape(40))
    stages = [p for p in ray.processes if p.roles[0] in ("learner", "rollout", "teacher")]
    assert [(p.name, p.count) for p in stages] == [("learner rank", 1), ("rollout worker", 1), ("teacher scorer", 2)]
    (one, _redis) = threads.processes
    assert one.count == 1 and set(one.roles) == {"learner", "rollout", "teacher"}
    # what the stages hold, less the imports each of the four processes had of its own, and the in_process copy
    copy = [h.bytes for h in one.holdings if "published version" in h.what]
    assert copy and one.held_bytes == sum(p.count * p.held_bytes for p in stages) - 3 * PROCESS_BASE_BYTES + copy[0]
    busy = one.each_bytes - one.held_bytes  # every stage in its largest phase at once
    assert busy >= max(max(p.phases.values()) for p in stages)


def test_a_longer_prompt_or_batch_raises_the_learners_peak_and_activation_checkpointing_lowers_it():
    def learner_peak(*overrides, prompt=40):
        cfg = load_config(None, ["model.student=tiny:qwen-student", "model.teacher=tiny:qwen-teacher", *overrides])
        return predict_memory(cfg, RunShape(prompt)).processes[0].each_bytes

    base = learner_peak()
    assert learner_peak(prompt=200) > base
    assert learner_peak("trainer.ppo_micro_batch_size_per_gpu=8", "trainer.train_batch_size=8") > base
    assert learner_peak("trainer.activation_checkpointing=true", prompt=200) < learner_peak(prompt=200)


def test_a_run_whose_held_memory_cannot_fit_is_refused_with_what_to_change(tmp_path):
    cfg = load_config(None, ["model.student=tiny:qwen-student", "model.teacher=tiny:qwen-teacher"])
    ledger = predict_memory(cfg)
    assert check_fits(ledger, cfg, ledger.total_bytes) is None
    warning = check_fits(ledger, cfg, ledger.total_bytes - 1)  # the peaks together pass it: fits if they do not meet
    assert warning.startswith("warning:") and "model.dtype=bfloat16" in warning
    with pytest.raises(ConfigError) as err:
        check_fits(ledger, cfg, ledger.held_bytes - 1)
    text = str(err.value)
    assert "\n" not in text and "cannot fit" in text and f"{ledger.held_bytes / 1e9:.1f} GB" in text
    assert "model.lora.rank=16" in text and "pipeline.check_memory=false" in text


def test_gkd_async_run_refuses_a_student_too_big_for_this_machine_before_anything_starts(tmp_path):
    """A 72B-shaped student (its config and the real tokenizer, no weights): refused in one line, in seconds, with
    no run directory made and no weights loaded."""
    student = tmp_path / "big-student"
    source = resolve_model_path("tiny:qwen-student")
    student.mkdir()
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (student / f.name).write_bytes(f.read_bytes())
    config = json.loads((student / "config.json").read_text())
    config.update(hidden_size=8192, num_hidden_layers=80, intermediate_size=29568, num_attention_heads=64)
    config.pop("layer_types", None)  # one per layer: transformers fills it in for the 80
    (student / "config.json").write_text(json.dumps(config))
    runs = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", f"model.student={student}", "model.teacher=tiny:qwen-teacher",
         f"logging.dir={runs}", "pipeline.launcher=threads"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "cannot fit" in line]
    assert len(errors) == 1 and "GB available" in errors[0] and "model.lora.rank=16" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_each_process_reports_its_peak_once_per_role_and_the_ledger_is_set_beside_it(redis_client, names):
    reports = ProcessMemory(redis_client, names.memory)
    for consumer, role in (("learner-0", "learner"), ("rollout-0", "rollout"), ("teacher-0", "teacher")):
        reports.report(consumer, role)  # three stages of this one process, as under pipeline.launcher=threads
    redis_client.hset(names.memory, "junk", b"not json")  # anyone on the run's Redis can write the hash
    (process,) = reports.by_process().values()
    assert sorted(process["roles"]) == ["learner", "rollout", "teacher"]
    assert process["peak_rss"] == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > 0
    cfg = load_config(None, ["model.student=tiny:qwen-student", "model.teacher=tiny:qwen-teacher"])
    predicted = predict_memory(cfg).as_dict()["processes"]
    rows = compare_with_measured(predicted, reports.by_process())
    seen = {row["process"]: row["processes_seen"] for row in rows}
    assert seen == {"learner rank": 1, "rollout worker": 1, "teacher scorer": 1, "redis-server (private)": 0}
    assert all(row["measured_bytes"] == process["peak_rss"] for row in rows if row["processes_seen"])
