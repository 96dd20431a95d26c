"""Transitional: re-exports for cli.py until the lead re-points it at `moe_mtl.runs` (then deleted with the
package `moe_mtl.transfer`)."""

from ..runs import read_upstream, resolve_checkpoint, resume_mismatch, run_tokenizer_path

__all__ = ["read_upstream", "resolve_checkpoint", "resume_mismatch", "run_tokenizer_path"]
