"""Evaluation: per-data_source sampling, mean@k / pass@k (``python -m asyncrl.eval``)."""
