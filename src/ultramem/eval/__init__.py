"""Evaluation: held-out loss and bits per byte, task accuracy, the lm-eval adapter, the study.

Modules: `perplexity` (text metrics), `task_eval` (teacher-forced exact match), `run` (a
checkpoint's full evaluation, JSON and table), `study` and `report` (`ultramem study`),
`lm_eval_adapter` (`--model ultramem` for lm-evaluation-harness; needs the `eval` extra).
"""
