"""The work of a stage node (finetune one stage) and of an unlearning leaf (unlearn from a published node).

Shared by `reteq run-path` (one process: `leaf.run_leaf` trains the order's missing nodes in turn, then unlearns)
and `reteq sweep` (each node its own Ray task, each leaf its own Tune trial: `node.train_node`,
`leaf.unlearn_leaf`). What differs is injected through one RunContext: the WorkerContext (rank, DeepSpeed) and
Hooks (where progress and metrics go: stdout, or MLflow).

- context.py: what the work runs in: RunContext, Hooks, this machine's CheckpointStore, the DataCache;
- preflight.py: everything that can be wrong with the input, checked before any training;
- node.py: a stage node's work (train_node), and a chain of them in one process (ensure_chain);
- leaf.py: an unlearning leaf's work (unlearn_leaf), theta_r's record (record_retrain), the evaluator and probe
  every leaf and record shares, and run-path's whole path (run_leaf).
"""
