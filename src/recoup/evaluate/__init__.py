"""Evaluation: perplexity, the batched Scorer, task families and metrics."""
