"""Data: rows in any supported format (rows.py), prompts templated and tokenized (prompts.py) and cached
(prompt_cache.py), the cursor over them (cursor.py), SFT pairs (pairs.py), built-in tasks (tasks.py) and scored
data sets on disk (scored_dataset.py).
"""
