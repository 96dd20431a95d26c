"""Transitional: the files of task representations are `moe_mtl.representations.files`; this re-export serves
cli.py until the lead re-points it at merge, then it is deleted (models read no representation files)."""

from ..representations.files import read_task_embeddings

__all__ = ["read_task_embeddings"]
