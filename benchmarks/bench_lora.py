"""LoRA students against full fine-tuning, as the learner holds them: trainable parameters, optimizer state,
checkpoint size, the time of a training step and of a publish (the adapters merged into the plain weights,
a tensor at a time, against the plain weights streamed as they are).

For each student (the character-level `tiny:student` and the real-vocabulary `tiny:qwen-student`), full
fine-tuning and LoRA at each `--ranks` are measured in the same run, one FSDP2 rank (gloo, CPU), AdamW,
`--steps` steps of a batch of 8 sequences of 96 tokens (cross-entropy on random tokens: the optimizer and
the adapters' cost do not depend on the loss). Ratios are against full fine-tuning of the same student.

    .venv/bin/python benchmarks/bench_lora.py [--ranks 8 32] [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gkd_async.config.loading import load_config
from gkd_async.models.lora import load_trainable_student, lora_scalings, merge_lora
from gkd_async.train.checkpoint import iter_full_tensors, save_checkpoint
from gkd_async.train.fsdp import shard_model
from gkd_async.transport.local_redis import free_port


def measure(student: str, rank: int, steps: int) -> dict[str, float]:
    cfg = load_config(
        None, [f"model.student={student}", f"model.lora.rank={rank}", f"model.lora.alpha={2 * max(rank, 1)}"]
    )
    model = shard_model(load_trainable_student(cfg.model), "float32", False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (8, 96), generator=generator)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    start = time.perf_counter()
    published = sum(t.numel() for _, t in merge_lora(iter_full_tensors(model), lora_scalings(model)))
    publish_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as root:
        path = save_checkpoint(Path(root), 1, model, optimizer, {})
        checkpoint_bytes = sum(f.stat().st_size for f in path.iterdir())
    return {
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in model.parameters()),
        "optimizer_mb": state_bytes / 2**20,
        "checkpoint_mb": checkpoint_bytes / 2**20,
        "step_s": sum(times[1:]) / steps,
        "publish_s": publish_s,
        "published": published,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    print("| student | training | trainable params | optimizer state | checkpoint | s/step | publish |")
    print("|---|---|---|---|---|---|---|")
    for student in ("tiny:student", "tiny:qwen-student"):
        full = measure(student, 0, args.steps)
        for rank in [0, *args.ranks]:
            m = full if rank == 0 else measure(student, rank, args.steps)
            assert m["published"] == full["published"], "a merged publish must be the plain model's size"
            label = "full" if rank == 0 else f"LoRA r={rank}"
            print(
                f"| `{student}` | {label} | {m['trainable'] / 1e6:.3f}M of {m['total'] / 1e6:.2f}M "
                f"| {m['optimizer_mb']:.2f} MB ({m['optimizer_mb'] / full['optimizer_mb']:.3f}x) "
                f"| {m['checkpoint_mb']:.2f} MB ({m['checkpoint_mb'] / full['checkpoint_mb']:.3f}x) "
                f"| {m['step_s']:.3f} ({m['step_s'] / full['step_s']:.2f}x) "
                f"| {m['publish_s']:.3f} s ({m['publish_s'] / full['publish_s']:.2f}x) |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
