"""The run's configuration: the schema by section (base, model_data, engines, objective, pipeline, trainer; schema.py
joins them), loading YAML and overrides (loading.py), checks across keys (checks.py), the facts derived from a
validated config (plan.py) and the checks of the data against it at start (preflight.py).
"""
