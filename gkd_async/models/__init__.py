"""Models: loading by Hub id, directory or tiny preset, tokenizers and tied weights (loading.py), the HF cache
(hub.py), and LoRA adapters on a frozen student (lora.py).
"""
