"""Experiments over many runs: few-shot fine-tuning on unseen tasks (`fewshot`) and the summary table (`summary`)."""
