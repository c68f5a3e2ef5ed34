"""custom_dataset hook of the YAMLs here: the examples come from `ultramem.tasks` (no download)."""

from ultramem.eval.lm_eval_adapter import load_dataset  # noqa: F401
