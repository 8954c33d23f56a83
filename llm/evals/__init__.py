"""Evaluation: scores a model on the tasks of `llm/tasks/` (multiple choice, generative pass@k, bits per byte)."""
