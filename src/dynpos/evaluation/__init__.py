"""Evaluation: perplexity against evaluation length, bias plots, sweep reports."""
