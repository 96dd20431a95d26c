"""Evaluation: CrossFit metrics and ARG, and route analysis."""
