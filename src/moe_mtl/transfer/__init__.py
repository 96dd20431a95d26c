"""Transfer to unseen tasks: task representations, routes of unseen tasks, and starting a run from a trained one.

- `representations`: text and Fisher task representations, files of vectors, `moe-mtl represent`.
- `init_from`: the upstream checkpoint of `--model.init_from`, its weights mapped onto new tasks by name.
- `unseen_routes`: the route of a task without a trained task-table row (representation, nearest, average,
  random, learned).
"""
