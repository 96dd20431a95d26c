"""Evaluation: CrossFit metrics and ARG, per-task evaluation, and route statistics and the route heatmap."""
