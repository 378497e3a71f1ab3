"""Benchmark evaluation: task configs (``conf/eval/task/``), model passes, metrics, the
``mmfuse-eval`` runner with its result cache, modality ablations and the validation callback.

tasks.py (task config + data) -> inference.py (generation, option log-likelihood, NLL)
-> scoring.py (metrics) -> runner.py (checkpoints x tasks x ablations, cache.py, table.py,
ablation.py); validation.py runs the same tasks inside Lightning validation.
"""
