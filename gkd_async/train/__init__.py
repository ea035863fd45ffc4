"""The learner's training: samples and micro-batches (batching.py), the optimiser step (step.py), FSDP2 and the
schedule (fsdp.py), checkpoints (checkpoint.py), evaluation (evaluation.py), metrics (metrics.py) and the SFT
that makes the demo's teacher (sft.py).
"""
