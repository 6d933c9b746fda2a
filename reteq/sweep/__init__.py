"""Execution: Ray Tune trials of Ray Train workers (execute), who trains a shared node (coordinator), MLflow
as the system of record (record: runs and resume; mlflow_store: client, experiment, paged search)."""
