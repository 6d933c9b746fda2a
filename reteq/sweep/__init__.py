"""Execution: one sweep attempt on Ray, recorded in MLflow.

driver (the attempt: MLflow setup, Ray session, close every run; `settings.SweepRun` is what it hands every Ray
process) -> execute (the plan as a DAG) -> nodes (stage nodes as Ray tasks chained by object refs) and leaves
(unlearning leaves as Tune trials over named axes, handed out by dag once their nodes are published), retrain_records
(theta_r evaluated, one task each); worker (what every Ray process shares: the parsed config, one rank's run, a
worker group), launcher (submits from a placement group so nodes and leaves share warm workers), ray_session,
stage_resume. MLflow (through reteq.mlflow_store, the only client, one layer down): record (runs, tags, resume),
lifecycle (closing what a dead process left RUNNING), repair and delivery (checkpoints between the store and
MLflow). lock (one sweep per work dir), faults (test-only fault injection), cluster_fit (every request of a
sweep fits some node type of a cluster file: checked before Ray starts)."""
