"""`reteq theory [CONFIG] [--json]`: the Section 3 grid into work_dir's MLflow store, and its summary."""

from __future__ import annotations

import json
import sys
from contextlib import redirect_stdout

from reteq import tracking as tk
from reteq.redact import redact
from reteq.theory.grid import load_theory_config, run_theory_grid
from reteq.workdir import resolve_work_dir


def theory_command(config_path: str | None, work_dir: str, as_json: bool) -> int:
    """`reteq theory [CONFIG] [--json]`: run the grid into work_dir's MLflow store and print a summary.

    Exit codes: 0 the bound held on every instance, 1 it failed somewhere (a bug or a counterexample); bad
    input (config or cluster) raises BadInput (exit 2). With as_json, stdout carries exactly one JSON object
    (Tune's output goes to stderr)."""
    cfg = load_theory_config(config_path)
    work = resolve_work_dir(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    uri, root = tk.default_tracking_uri(work), tk.default_artifact_root(work)
    with redirect_stdout(sys.stderr):
        summary = run_theory_grid(cfg, uri, root, cfg.name, storage_path=str(work / "ray_results"))
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    else:
        share = summary["bound_holds"] / max(summary["instances"], 1)
        print(
            f"theory grid '{cfg.name}': {summary['instances']} instances in {summary['cells']} cells, "
            f"{summary['wall_s']:.1f} s"
        )
        print(
            f"Theorem 3.1 bound held on {summary['bound_holds']}/{summary['instances']} ({share:.1%}); "
            f"t0 inside the {cfg.steps}-step horizon on {summary['nonvacuous']}"
        )
        print(f"MLflow: {redact(uri)}  experiment '{summary['experiment']}' (id {summary['experiment_id']})")
    return 0 if summary["bound_holds"] == summary["instances"] else 1
