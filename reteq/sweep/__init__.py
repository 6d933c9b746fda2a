"""Execution: the plan as a DAG (execute) — stage nodes as Ray tasks chained by object refs (nodes), leaves as
Tune trials over named axes (leaves) handed out once their nodes are published (dag), what every Ray process
shares (worker) — and MLflow as the system of record (record: runs and resume; mlflow_store: client,
experiment, paged search)."""
