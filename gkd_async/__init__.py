"""gkd-async: on-policy knowledge distillation with decoupled rollout, teacher scoring and learning."""

__version__ = "0.1.0"
