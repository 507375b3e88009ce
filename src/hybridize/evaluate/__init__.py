"""Evaluation: generation accuracy on verifiable rows, teacher-forced KL/perplexity/agreement vs a teacher.

A saved checkpoint also runs under lm-evaluation-harness (docs/lm-eval.md).
"""

from hybridize.evaluate.evaluator import evaluate, format_table, save_result, score_completions

__all__ = ["evaluate", "format_table", "save_result", "score_completions"]
