"""Evaluation: captioning and few-shot evaluators."""
