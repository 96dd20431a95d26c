"""Task representations (Ye et al. 2022): one vector per task, the one name for what the MoE option
`task_embeddings`, `moe-mtl represent` and the unseen-task routes use.

- `compute`: text and Fisher representations of tasks, computed from their training examples.
- `cache`: the fingerprints that name cached results (`<cache_dir>/<fingerprint>.pt`).
- `files`: reading and writing files of representations (.pt, .json, .npy), and the MoE option `task_embeddings`.
- `unseen_routes`: the route of a task without a trained task-table row (representation, nearest, average,
  random, learned).
- `pretrained`: pretrained sentence encoders: all-MiniLM-L6-v2's folder (the extra `represent`), and how a
  sentence-transformers folder pools its token states.
"""
