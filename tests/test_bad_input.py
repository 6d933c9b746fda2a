"""Bad input: one line on stderr naming the file (or flag) and the field, exit 2, and nothing trained.

Every case goes through `reteq run-path` (the command that would train) with its own work dir, and checks that
no checkpoint, not even the work dir, was created.
"""

from __future__ import annotations

import json

import pytest
from helpers import checkpoint_dirs, reteq_cache, sweep_dict, write_config  # noqa: F401  (session fixture)

from reteq.cli import EXIT_BAD_INPUT, main

pytestmark = pytest.mark.usefixtures("reteq_cache")

GOOD_ROW = {"messages": [{"role": "user", "content": "Help me."}, {"role": "assistant", "content": "Sorry, no."}]}


def _set(raw: dict, path: tuple, value) -> None:
    d = raw
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _run_path(tmp_path, capsys, raw: dict, *flags: str) -> str:
    """Run `reteq run-path` on `raw`; assert exit 2, one stderr line, no training output; return the line."""
    config = write_config(tmp_path / "sweep.yaml", raw)
    work = tmp_path / "work"
    try:
        rc = main(["run-path", str(config), "--work-dir", str(work), *flags])
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        rc = e.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == EXIT_BAD_INPUT, captured
    assert len(lines) == 1, lines
    assert "[stage]" not in captured.out and "step" not in captured.out
    assert not work.exists() and checkpoint_dirs(work) == []
    return lines[0]


# ---- config problems: `<config file>: <field>: <reason>` --------------------------------------------------------

CONFIG_CASES = {
    # id: (field path in the YAML, bad value, expected field in the line, expected words of the reason)
    "unknown-algorithm": (("unlearn", "algorithms"), ["ga", "gdiff"], "unlearn", "unknown algorithm 'gdiff'"),
    "order-not-a-permutation": (("orders",), {"explicit": [["inst", "tofu", "math", "U"], ["inst", "U", "U", "math"]]},
                                "orders", "is not a permutation of the declared stages"),
    "order-missing-a-stage": (("orders",), {"explicit": [["inst", "tofu", "math"]]}, "orders", "not a permutation"),
    "forget-stage-undeclared": (("forget_stage",), "S_U", "forget_stage", "'S_U' is not a declared stage"),
    "forget-position-outside": (("orders", "forget_positions"), [5], "orders.forget_positions", "outside 1..4"),
    "stage-lr-zero": (("stages", 1, "lr"), 0, "stages[1].lr", "must be > 0"),
    "stage-lr-negative": (("stages", 1, "lr"), -1e-5, "stages[1].lr", "must be > 0"),
    "stage-lr-not-a-number": (("stages", 1, "lr"), "abc", "stages[1].lr", "not a number ('abc')"),
    "unlearn-lr-zero": (("unlearn", "lrs"), [1e-3, 0.0], "unlearn.lrs[1]", "must be > 0"),
    "eval-every-zero": (("unlearn", "eval_every"), 0, "unlearn.eval_every", "must be > 0"),
    "eval-every-negative": (("unlearn", "eval_every"), -2, "unlearn.eval_every", "must be > 0"),
    "unknown-dtype": (("models", 0, "dtype"), "fp16", "models[0].dtype", "'fp32', 'tf32' or 'bf16'"),
    "model-path-missing": (("models", 0, "source"), "./no/such/model", "models[0].source",
                           "model path ./no/such/model does not exist"),
    # a method's knobs (unlearn.params): only methods the sweep runs, only knobs they declare, usable values
    "params-unknown-method": (("unlearn", "params"), {"wgaa": {"beta": [1.0]}}, "unlearn.params",
                              "unknown algorithm 'wgaa'"),
    "params-unknown-knob": (("unlearn", "params"), {"npo": {"strength": [1.0]}}, "unlearn.params",
                            "npo has no knob 'strength' (its knobs: beta)"),
    "params-method-not-swept": (("unlearn", "params"), {"wga": {"beta": [1.0]}}, "unlearn",
                                "which unlearn.algorithms does not sweep"),
    "params-empty-grid": (("unlearn", "params"), {"npo": {"beta": []}}, "unlearn.params", "give at least one"),
    "params-whole-number": (("unlearn", "params"), {"rmu": {"layer": [1.5]}}, "unlearn.params",
                            "rmu.layer: takes whole numbers"),
    "retain-stage-undeclared": (("unlearn", "retain_stage"), "S_R", "unlearn.retain_stage",
                                "'S_R' is not a declared stage"),
    # names are names (config_files.NAME_PATTERN): never a path, a quote or a run filter (docs/security.md)
    "sweep-name-is-a-path": (("name",), "../../../x", "name", "'../../../x' is not a name"),
    "sweep-name-has-a-quote": (("name",), "it's", "name", "is not a name"),
    "sweep-name-too-long": (("name",), "a" * 65, "name", "is not a name: 1-64 letters"),
    "model-name-is-a-path": (("models", 0, "name"), "a/b", "models[0].name", "'a/b' is not a name"),
    "stage-name-has-a-space": (("stages", 0, "name"), "in st", "stages[0].name", "'in st' is not a name"),
    # numbers beyond sane bounds (reteq.config_files MAX_*)
    "unlearn-steps-1e15": (("unlearn", "steps"), 1e15, "unlearn.steps", "must be <= 10000000"),
    "rows-1e15": (("stages", 0, "source", "n"), 1e15, "stages[0].source.n", "must be <= 10000000"),
    "max-length-1e12": (("stages", 0, "max_length"), 1e12, "stages[0].max_length", "must be <= 131072"),
    "unlearn-max-length-1e12": (("unlearn", "max_length"), 1e12, "unlearn.max_length", "must be <= 131072"),
    "math-samples-1e9": (("eval", "math_samples"), 10**9, "eval.math_samples", "must be <= 100000"),
    "forget-prompts-1e9": (("eval", "forget_prompts"), 10**9, "eval.forget_prompts", "a number in 1..100000"),
    # a global batch of 8 in micro-batches of 4 cannot split over 3 workers (docs/cluster.md: across worker counts)
    "batch-does-not-split-over-workers": (("execution",), {"workers": 3}, "stages[0].global_batch",
                                          "does not split into micro-batches of 4 over execution.workers 3"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_problem_is_one_line_with_file_and_field(tmp_path, capsys, case):
    path, value, field, reason = CONFIG_CASES[case]
    raw = sweep_dict(tmp_path)
    _set(raw, path, value)
    line = _run_path(tmp_path, capsys, raw)
    assert line.startswith(f"{tmp_path / 'sweep.yaml'}: {field}"), line
    assert reason in line, line


@pytest.mark.parametrize("field,value,reason", [
    ("cpus_per_worker", float("inf"), "must be a finite number"),
    ("cpus_per_worker", float("nan"), "must be a finite number"),
    ("cpus_per_worker", 1e6, "must be <= 1024"),
    ("gpus_per_worker", float("inf"), "must be a finite number"),
    ("workers", 10**6, "must be <= 4096"),
    ("max_concurrent_trials", 10**9, "must be <= 4096"),
], ids=["cpus-inf", "cpus-nan", "cpus-1e6", "gpus-inf", "workers-1e6", "concurrent-1e9"])
def test_execution_numbers_beyond_bounds_are_one_line(tmp_path, capsys, field, value, reason):
    raw = sweep_dict(tmp_path)
    raw.setdefault("execution", {})[field] = value
    line = _run_path(tmp_path, capsys, raw)
    assert line.startswith(f"{tmp_path / 'sweep.yaml'}: execution.{field}: {reason}"), line


def test_absolute_model_path_missing(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["models"][0]["source"] = str(tmp_path / "nowhere")
    line = _run_path(tmp_path, capsys, raw)
    assert line == f"{tmp_path / 'sweep.yaml'}: models[0].source: model path {tmp_path / 'nowhere'} does not exist"


def test_missing_local_data_file(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["stages"][3]["source"] = {"kind": "local", "path": str(tmp_path / "refusals.jsonl")}
    line = _run_path(tmp_path, capsys, raw)
    assert line.startswith(f"{tmp_path / 'sweep.yaml'}: stages[3].source: ")
    assert f"data file {tmp_path / 'refusals.jsonl'} does not exist" in line


# ---- problems only visible once the data or model is opened: still before any training ------------------------------

@pytest.mark.parametrize("row,reason", [
    ({"prompt": "Help me.", "response": "No."}, "no 'messages' field"),
    ({"messages": [{"role": "user", "content": "Help me."}]}, "no assistant turn"),
], ids=["no-messages", "no-assistant-turn"])
def test_bad_rows_fail_before_training_naming_file_and_row(tmp_path, capsys, row, reason):
    data = tmp_path / "refusals.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [GOOD_ROW, GOOD_ROW, row, GOOD_ROW]) + "\n")
    raw = sweep_dict(tmp_path)
    raw["stages"][3]["source"] = {"kind": "local", "path": str(data)}  # U, the last stage of the path
    line = _run_path(tmp_path, capsys, raw)
    assert f"{data}: row 2: {reason}" in line and "stages.U.source" in line, line


def test_model_directory_without_config(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "weights.txt").write_text("x")
    raw = sweep_dict(tmp_path)
    raw["models"][0]["source"] = str(tmp_path / "not-a-model")
    line = _run_path(tmp_path, capsys, raw)
    assert "model tiny" in line and "has no config.json" in line, line


# ---- command-line flags: `error: --flag: reason` ------------------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [
    (("--algorithm", "gdiff"), "error: --algorithm: unknown algorithm 'gdiff'"),
    (("--order", "inst,tofu,math"), "error: --order: inst,tofu,math is not a permutation"),
    (("--order", "inst,tofu,math,U,U"), "error: --order: inst,tofu,math,U,U is not a permutation"),
    (("--lr", "0"), "error: --lr: must be a finite number > 0"),
    (("--lr=-1e-5",), "error: --lr: must be a finite number > 0"),
    (("--lr", "inf"), "error: --lr: must be a finite number > 0"),
    (("--beta", "0"), "error: --beta: must be a finite number > 0"),
    (("--model", "llama"), "error: --model: 'llama' is not a model of this config"),
], ids=["algorithm", "order-short", "order-repeated", "lr-zero", "lr-negative", "lr-inf", "beta-zero", "model"])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, expected):
    assert _run_path(tmp_path, capsys, sweep_dict(tmp_path), *flags).startswith(expected)


@pytest.mark.parametrize("flags", [("--lr", "abc"), ("--seed", "x"), ("--bogus",)], ids=["lr", "seed", "unknown"])
def test_a_flag_argparse_rejects_is_one_line(tmp_path, capsys, flags):
    line = _run_path(tmp_path, capsys, sweep_dict(tmp_path), *flags)
    assert line.startswith(("reteq run-path: error: ", "reteq: error: ")) and flags[0] in line, line


# ---- empty grids ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,value", [(("orders",), {"explicit": []}), (("models",), []), (("unlearn", "lrs"), [])],
                         ids=["orders", "models", "lrs"])
def test_an_empty_grid_is_a_config_error(tmp_path, capsys, path, value):
    raw = sweep_dict(tmp_path)
    _set(raw, path, value)
    line = _run_path(tmp_path, capsys, raw)
    assert line.startswith(f"{tmp_path / 'sweep.yaml'}: {'.'.join(map(str, path))}")


# ---- hub data: gated / unreachable (HF_HUB_OFFLINE=1 makes every hub load fail) or malformed ---------------------

def _cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """Run the CLI; return its exit code and its stderr lines that are reteq's own (not datasets' progress bars)."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, [line for line in captured.err.splitlines() if line.startswith(("error: ", argv[1]))]


def test_an_unreachable_hub_dataset_stops_a_sweep_in_one_line_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = sweep_dict(tmp_path)
    raw["stages"][3]["source"] = {"kind": "hub", "id": "sorry-bench/sorry-bench-202503"}
    config = write_config(tmp_path / "sweep.yaml", raw)
    work = tmp_path / "work"
    rc, lines = _cli(capsys, ["sweep", str(config), "--work-dir", str(work), "--no-report", "--allow-unpinned-hub"])
    assert rc == EXIT_BAD_INPUT and len(lines) == 1, lines
    assert lines[0].startswith("error: stages.U.source: cannot load hub dataset 'sorry-bench/sorry-bench-202503'")
    assert "huggingface-cli login" in lines[0]
    assert not work.exists()


def test_a_hub_dataset_without_the_published_columns_stops_run_path_in_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "tofu-like" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["q"], "reply": ["a"]}), folder / "train-00000-of-00001.parquet")
    raw = sweep_dict(tmp_path)
    raw["stages"][1]["source"] = {"kind": "hub", "id": str(tmp_path / "tofu-like"), "converter": "tofu"}
    config = write_config(tmp_path / "sweep.yaml", raw)
    rc, lines = _cli(capsys, ["run-path", str(config), "--work-dir", str(tmp_path / "work")])
    assert rc == EXIT_BAD_INPUT and len(lines) == 1, lines
    assert lines[0].startswith("error: stages.tofu.source: ") and "missing column(s) ['question', 'answer']" in lines[0]
    assert not (tmp_path / "work").exists()


def test_a_hub_source_without_a_converter_fails_validate_in_one_line(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["stages"][1]["source"] = {"kind": "hub", "id": "someone/unknown-dataset"}
    config = write_config(tmp_path / "sweep.yaml", raw)
    rc, lines = _cli(capsys, ["validate", str(config)])
    assert rc == EXIT_BAD_INPUT and len(lines) == 1, lines
    assert lines[0].startswith(f"{config}: stages[1].source: someone/unknown-dataset: no converter is registered")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_hub_source_without_a_commit_revision_is_refused_naming_file_and_field(tmp_path, capsys):
    """Issue 30 item 7: a hub dataset or model follows its branch unless pinned to a commit; validate, plan, sweep
    and `data prepare` refuse it in one line per source (exit 2) before anything is downloaded."""
    raw = sweep_dict(tmp_path)
    raw["stages"][1]["source"] = {"kind": "hub", "id": "locuslab/TOFU", "subset": "full"}
    raw["eval"]["math_source"] = {"kind": "hub", "id": "openai/gsm8k", "subset": "main", "split": "test",
                                  "revision": "main"}
    config = write_config(tmp_path / "sweep.yaml", raw)
    for verb in (["validate"], ["plan"], ["sweep", "--work-dir", str(tmp_path / "work")], ["data", "prepare"]):
        rc = main([*verb, str(config)])
        lines = capsys.readouterr().err.splitlines()
        assert rc == EXIT_BAD_INPUT and lines == [
            f"{config}: stages[1].source.revision: hub source locuslab/TOFU has no `revision`: pin it to the 40-hex "
            "commit to download (docs/security.md), or pass --allow-unpinned-hub",
            f"{config}: eval.math_source.revision: hub source openai/gsm8k revision 'main' is not a commit id: pin it "
            "to the 40-hex commit to download (docs/security.md), or pass --allow-unpinned-hub"], (verb, lines)
    assert not (tmp_path / "work").exists()
    raw["stages"][1]["source"]["revision"] = raw["eval"]["math_source"]["revision"] = COMMIT
    config = write_config(tmp_path / "sweep.yaml", raw)
    assert main(["validate", str(config)]) == 0 and capsys.readouterr().out == f"{config}: ok\n"
    raw["models"][0]["source"] = "someone/some-model"
    config = write_config(tmp_path / "sweep.yaml", raw)
    rc, lines = _cli(capsys, ["validate", str(config)])
    assert rc == EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith(
        f"{config}: models[0].revision: hub source someone/some-model has no `revision`"), lines
    raw["models"][0]["revision"] = COMMIT.upper()  # a commit id is lowercase hex, as the hub writes it
    config = write_config(tmp_path / "sweep.yaml", raw)
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert main(["validate", str(config), "--allow-unpinned-hub"]) == 0


def test_a_deepspeed_config_that_is_not_json_stops_a_sweep_in_one_line(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text("{not json")
    raw = sweep_dict(tmp_path)
    raw.setdefault("execution", {})["deepspeed"] = str(ds)
    config = write_config(tmp_path / "sweep.yaml", raw)
    rc, lines = _cli(capsys, ["sweep", str(config), "--work-dir", str(tmp_path / "work"), "--no-report"])
    assert rc == EXIT_BAD_INPUT and lines == [f"error: execution.deepspeed: {ds} is not valid JSON "
                                              "(Expecting property name enclosed in double quotes)"], lines
    assert not (tmp_path / "work").exists()


def test_a_forget_target_that_is_not_a_number_is_one_line_before_anything_is_read(tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["report", "--experiment", "x", "--work-dir", str(work), "--forget-target", "nan"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: report: --forget-target: must be a finite forget score, got nan"], err
    assert not work.exists()


def test_report_on_an_experiment_that_does_not_exist_is_one_line_naming_those_that_do(tmp_path, capsys):
    from reteq import tracking as T
    from reteq.mlflow_store import ensure_experiment

    work = tmp_path / "work"
    assert main(["report", "--experiment", "typo", "--work-dir", str(work)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no MLflow store at ") and "'typo'" in err and len(err.splitlines()) == 1
    assert not (work / "mlflow.db").exists()  # asking made no store

    work.mkdir()
    ensure_experiment(T.default_tracking_uri(work), "tiny-sweep", None)
    capsys.readouterr()  # what making the store printed (MLflow's own INFO lines, when its logging is on)
    assert main(["report", "--experiment", "tiny-sweep-typo", "--work-dir", str(work)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tiny-sweep-typo'" in err[0] and "it has: Default, tiny-sweep" in err[0], err


# ---- bounded parsing and planning: each refusal in <= 5 s and <= 1 GiB, one line, exit 2 (docs/security.md) ------

_BOUNDED = """
import json, sys, time
t = time.perf_counter()
from reteq.cli import main
rc = main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across fork+exec, so under
# a pytest that has loaded torch every child would "use" 1.1 GiB.
hwm_kib = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"rc": rc, "s": time.perf_counter() - t, "rss_mib": hwm_kib / 1024}))
"""


def _bounded(*argv: str) -> tuple[str, dict]:
    """`reteq ARGV` in its own process: (its stderr, {rc, seconds after import, peak RSS in MiB})."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _BOUNDED, *argv], capture_output=True, text=True, timeout=60)
    return p.stderr, json.loads(p.stdout.splitlines()[-1])


def _refused_fast(err: str, stats: dict, start: str, reason: str) -> None:
    lines = err.splitlines()
    assert stats["rc"] == EXIT_BAD_INPUT and len(lines) == 1, (stats, err[-2000:])
    assert lines[0].startswith(start) and reason in lines[0] and len(lines[0]) <= 400, lines[0]
    assert stats["s"] <= 5 and stats["rss_mib"] <= 1024, stats


BOMB = "a: &a [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "name: x\n")
    assert 300 < len(BOMB) < 1500  # 9^9 = 387 million strings once expanded
    err, stats = _bounded("validate", str(bomb))
    _refused_fast(err, stats, f"{bomb}: refused: ", "YAML")


def test_a_recursive_alias_and_an_oversized_file_are_refused(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [*a]\n")
    err, stats = _bounded("validate", str(loop))
    _refused_fast(err, stats, f"{loop}: refused: ", "a recursive YAML alias")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    err, stats = _bounded("plan", str(big))
    _refused_fast(err, stats, f"{big}: file is ", "a config may be at most 1048576 bytes")


def test_a_grid_over_the_leaf_limit_is_refused_by_validate_and_plan(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["seeds"] = list(range(1000))
    raw["unlearn"]["lrs"] = [1e-3 * (1 + i) for i in range(1000)]  # 10^6 unlearning runs
    config = write_config(tmp_path / "sweep.yaml", raw)
    for verb in ("validate", "plan"):
        err, stats = _bounded(verb, str(config))
        _refused_fast(err, stats, f"{config}: orders/unlearn: the grid has 1000000 unlearning runs, over the "
                      "limit of 10000", "pass --max-leaves 1000000")


def test_all_permutations_of_eleven_stages_is_refused(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["stages"] += [{**raw["stages"][0], "name": f"extra{i}"} for i in range(7)]
    raw["orders"] = {"all_permutations": True}
    config = write_config(tmp_path / "sweep.yaml", raw)
    err, stats = _bounded("plan", str(config))
    _refused_fast(err, stats, f"{config}: orders/unlearn: the grid has 39916800 unlearning runs", "--max-leaves")


def test_max_leaves_is_the_explicit_way_past_the_limit(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["unlearn"]["lrs"] = [1e-3 * (1 + i) for i in range(10_001)]
    config = write_config(tmp_path / "sweep.yaml", raw)
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert "10001 unlearning runs" in capsys.readouterr().err
    assert main(["validate", str(config), "--max-leaves", "10001"]) == 0
    assert capsys.readouterr().out.strip() == f"{config}: ok"


def test_an_error_line_never_carries_a_whole_hostile_value(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["stages"][1]["lr"] = "x" * 100_000
    line = _run_path(tmp_path, capsys, raw)
    assert line.startswith(f"{tmp_path / 'sweep.yaml'}: stages[1].lr: not a number ('xxx") and len(line) <= 400
