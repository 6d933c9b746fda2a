"""The `reteq` command: parses arguments and calls one function per verb (in `reteq.commands`).

Bad input (`reteq.errors.BadInput`, raised anywhere below) is one line per problem on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from reteq import environment
from reteq.config_files import MAX_LEAVES
from reteq.errors import BadInput
from reteq.resources import describe

# Each verb's module is imported inside its cmd_* function: importing them all here would load torch, Ray and
# MLflow for `reteq --help` or `reteq validate` (seconds on 2 cores). reteq.config_files (yaml, pydantic) is
# at the top: every command, --help included, builds the parser, which reads its MAX_LEAVES.

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def cmd_validate(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.plan import validate_command

    return validate_command(args.config, args.cluster, args.max_leaves, tuple(args.set), args.allow_unpinned_hub)


def cmd_plan(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.plan import plan_command

    return plan_command(args.config, args.json, args.cluster, args.max_leaves, tuple(args.set),
                        args.allow_unpinned_hub)


def cmd_run_path(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.run_path import PathFlags, run_path_command

    flags = PathFlags(model=args.model, order=args.order, algorithm=args.algorithm, lr=args.lr, beta=args.beta,
                      seed=args.seed, params=tuple(args.param))
    return run_path_command(args.config, flags, work_dir=args.work_dir, overrides=tuple(args.set))


def cmd_sweep(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.sweep import sweep_file_command

    return sweep_file_command(args.config, args.cluster, args.max_leaves, tuple(args.set), args.allow_unpinned_hub,
                              args.work_dir, not args.no_report)


def cmd_report(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.report import report_command

    return report_command(config=args.config, experiment=args.experiment, work_dir=args.work_dir,
                          leaves_out=args.leaves_out, forget_target=args.forget_target,
                          leaves_merge=args.leaves_merge)


def cmd_tables(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.tables import tables_command

    return tables_command(args.leaves, args.out, args.forget_target)


def cmd_theory(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.theory import theory_command

    return theory_command(args.config, args.work_dir or "runs/theory", args.json)


def cmd_data_prepare(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.data import prepare_command

    return prepare_command(args.config, args.out, args.allow_unpinned_hub)


def cmd_ui(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.report import ui_command

    return ui_command(args.work_dir, args.port)


def cmd_demo(args) -> int:
    # lazy: a verb loads only its own command; the CLI's startup stays torch-free
    from reteq.commands.sweep import demo_command

    return demo_command(args.config, args.work_dir)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are bad input too: one line (`reteq VERB: error: ...`) and exit 2, no usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one config field for this command, VALUE in YAML (repeatable), e.g. "
                   "--set seeds=[0,1] --set unlearn.algorithms=[ga,npo]: a slice of a design keeps its leaf keys")


def _grid_limits(p: argparse.ArgumentParser) -> None:
    """What validate, plan and sweep check a grid against: a cluster's node types and a bound on its size."""
    p.add_argument("--cluster", help="a Ray cluster file (cluster.yaml): every trial must fit one of its node types")
    p.add_argument("--max-leaves", type=int, default=MAX_LEAVES, metavar="N",
                   help=f"refuse a grid of more than N unlearning runs (default {MAX_LEAVES}; docs/security.md)")
    p.add_argument("--allow-unpinned-hub", action="store_true",
                   help="accept hub models and datasets without a commit `revision` (docs/security.md)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="reteq", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True, parser_class=OneLineParser)

    s = sub.add_parser("validate", help="check a sweep config; one line per problem")
    s.add_argument("config")
    _grid_limits(s)
    _overrides(s)
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("plan", help="the DAG of stage nodes and unlearning runs, and a GPU-hour estimate")
    s.add_argument("config")
    s.add_argument("--json", action="store_true")
    _grid_limits(s)
    _overrides(s)
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("run-path", help="one finetuning order and one unlearning run in one process (no Ray), for debugging")
    s.add_argument("config")
    s.add_argument("--model", help="model name (default: the first)")
    s.add_argument("--order", help="comma-separated stage order, e.g. inst,tofu,math,U (default: the first)")
    s.add_argument("--algorithm", help="a method of docs/methods.md, e.g. ga, npo, simnpo (default: the first)")
    s.add_argument("--lr", type=float, help="unlearning lr (default: the first)")
    s.add_argument("--beta", type=float, help="the method's beta: the same as --param <algorithm>.beta=<value>")
    s.add_argument("--param", action="append", default=[], metavar="METHOD.KNOB=VALUE",
                   help="set one of the leaf's method knobs, e.g. npo.beta=0.5 or rmu.layer=2 (repeatable; "
                        "default: each knob's first grid value; docs/methods.md lists them)")
    s.add_argument("--seed", type=int, help="seed (default: the first)")
    s.add_argument("--work-dir", help="override the config's work_dir")
    _overrides(s)
    s.set_defaults(fn=cmd_run_path)

    s = sub.add_parser("sweep", help="the whole grid through Ray Tune + Ray Train, recorded in MLflow")
    s.add_argument("config")
    s.add_argument("--work-dir")
    s.add_argument("--no-report", action="store_true", help="skip writing report.html at the end")
    _grid_limits(s)
    _overrides(s)
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("report", help="MLflow -> polars -> altair -> report.html")
    s.add_argument("config", nargs="?", help="the sweep config (gives the experiment and work_dir)")
    s.add_argument("--experiment")
    s.add_argument("--work-dir")
    s.add_argument("--leaves-out", help="also copy the report's leaves.csv (one row per unlearning leaf) to this path, "
                   "e.g. docs/results_smol/leaves.csv")
    s.add_argument("--leaves-merge", action="store_true", help="merge this store's leaves into the --leaves-out file "
                   "instead of replacing it: a design run slice by slice on several machines, one store each")
    s.add_argument("--forget-target", type=float, help="forget score at which orders are compared at equal "
                   "forgetting (default 1.0)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("tables", help="every results table of a leaves.csv as Markdown (what a results page quotes)")
    s.add_argument("leaves", help="a leaves.csv, e.g. docs/results_smol/leaves.csv")
    s.add_argument("--out", help="write the Markdown here (e.g. docs/results_smol/tables.md) instead of stdout")
    s.add_argument("--forget-target", type=float, help="forget score at which orders are compared at equal "
                   "forgetting (default 1.0)")
    s.set_defaults(fn=cmd_tables)

    s = sub.add_parser("theory", help="Section 3: staged ridge regression, GA unlearning, the Theorem 3.1 bound")
    s.add_argument("config", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--work-dir")
    s.set_defaults(fn=cmd_theory)

    s = sub.add_parser("data", help="data utilities")
    dsub = s.add_subparsers(dest="data_verb", required=True, parser_class=OneLineParser)
    d = dsub.add_parser("prepare", help="materialise every stage to local Parquet with a manifest")
    d.add_argument("config")
    d.add_argument("--out")
    d.add_argument("--allow-unpinned-hub", action="store_true",
                   help="accept hub datasets without a commit `revision` (docs/security.md)")
    d.set_defaults(fn=cmd_data_prepare)

    s = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1")
    s.add_argument("--work-dir", default="runs/demo")
    s.add_argument("--port", type=int, default=5000)
    s.set_defaults(fn=cmd_ui)

    s = sub.add_parser("demo", help="the embedded default: sweep + theory + report under runs/demo")
    s.add_argument("--config", default=None)
    s.add_argument("--work-dir", default=None)
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    environment.command_defaults()
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except BadInput as e:  # every bad-input path, hub data included; anything else is a bug: traceback
        config = str(getattr(args, "config", None) or "")
        for line in e.lines:  # a line names the config file first, or it is `error: <flag or field>: reason`
            named = config and line.startswith((f"{config}: ", f"{config} (with --set "))
            print(line if named else f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a full or read-only disk is one line too (exit 1); anything else keeps its traceback

        line = str(e) if getattr(e, "resource_error", False) else describe(e)
        if line is None:
            raise
        print(f"error: {line.splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
