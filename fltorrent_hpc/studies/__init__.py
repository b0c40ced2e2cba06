"""Scaling and privacy studies, the report beside the paper's numbers, and training data."""
