"""The losses: divergences over the teacher's top-k with a tail bucket (topk.py), the same from hidden states and
the LM head in chunks, never materialising the logits (fused_head.py), and the RL policy loss (policy.py).
"""
