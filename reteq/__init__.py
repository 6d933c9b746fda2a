"""reteq: path dependence in machine unlearning, as Ray-distributed sweeps (Yu, He, Goyal, Arora, 2025).

Layers, bottom to top; a module imports only from its own layer or below (tests/test_layers.py checks it,
and that no import cycle exists inside reteq, function-level imports included):

1. foundation  environment (process variables), errors (BadInput), redact (secrets out of output), resources (disk errors as one line), tracking (MLflow names), mlflow_store (the one MLflow client: used by sweep, theory and analysis), digest (content hashes), model_files (where weights
               are), algorithms (losses)
2. config      the typed sweep config
3. data        sources, hub converters, prepare, tokenising, packing
4. compute     models (+ tiny, gguf), train (loop, engines, recipes, checkpoints), eval (metrics)
5. pipeline    plan (the DAG), estimate (`reteq plan`), pipeline/ (the work of one node / leaf, its RunContext, preflight)
6. execution   sweep/ (the driver; every Ray entry point in sweep/remote.py: node tasks, Tune leaf trials, Ray Train;
               the MLflow record)
7. measures    analysis.gaps (gap, growth rate) and analysis.section: shared by theory and analysis
8. theory      Section 3 grid (Ray Tune + MLflow) and its report section
9. analysis    MLflow -> polars -> tables, charts, report.html
10. commands    commands/ (one module per verb), cli (argument parsing only), __main__
"""

__version__ = "0.1.0"
