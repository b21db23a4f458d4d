"""Prefix-tuning: data, the trainer and the job runner (docs/training.md)."""
