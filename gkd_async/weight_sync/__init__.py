"""Weights from the learner to the rollout workers: one interface (base.py), a factory that picks the run's
transport (factory.py), and one file per transport (redis_buckets.py, in_process.py, files.py,
ray_objects.py, collective.py).
"""
