"""The pipeline's stage processes: rollout, teacher scorer, learner and the coordinator.

Depends on gkd_async only; cli depends on this package, never the other way round.
"""
