"""Evaluations of train_gpt.py checkpoints."""
