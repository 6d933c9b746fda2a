"""Sweep: plan (grid -> DAG with content-addressed keys), run (Ray Tune trials of Ray Train workers), MLflow."""
