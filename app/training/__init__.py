"""Prefix-tuning: data, the trainer and the job runner (DESIGN.md §6)."""
