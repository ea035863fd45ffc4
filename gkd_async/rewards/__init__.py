"""Rewards: loading the user's reward function (loading.py), running it in processes of its own (pool.py), and
the built-in reward functions (functions.py).
"""
