"""Scoring: lm-eval-harness runs of trained adapters (``python -m eval.commonsense``)."""
