"""`reteq data prepare`: stages to local Parquet + manifest, reused on the next run, one-line errors."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fixtures import hub_schemas as fx
from helpers import reteq_cache  # noqa: F401

from reteq.cli import EXIT_BAD_INPUT, main
from reteq.config import DataSource, parse_config
from reteq.data import converters, hub, prepare
from reteq.data.prepare import lookup_prepared, read_prepared
from reteq.digest import sha256_file

# `reteq data prepare` measures each stage's rows with every model's tokenizer: the tiny one from the session cache
pytestmark = pytest.mark.usefixtures("reteq_cache")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def raw(tmp_path) -> dict:
    """A paper-shaped config whose four hub stages are local folders in the published schemas."""
    fx.write_tofu(tmp_path), fx.write_gsm8k(tmp_path), fx.write_sorry_bench(tmp_path)
    skillmix = fx.write_skillmix(tmp_path)

    def stage(name, **source):
        return {"name": name, "source": {"kind": "hub", **source}, "global_batch": 8, "micro_batch": 8}

    return {
        "name": "prep",
        "work_dir": str(tmp_path / "work"),
        "models": [{"name": "tiny", "source": "builtin:tiny"}],
        "stages": [
            stage(
                "inst",
                id=str(tmp_path / "skillmix"),
                subset=f"data/{skillmix.name}",
                converter="instruct_skillmix",
            ),
            stage("tofu", id=str(tmp_path / "tofu"), converter="tofu"),
            stage("math", id=str(tmp_path / "gsm8k" / "main"), converter="gsm8k"),
            stage("U", id=str(tmp_path / "sorry-bench"), converter="sorry_bench"),
        ],
        "orders": {"forget_positions": [1, 4], "retain_order": ["inst", "tofu", "math"]},
        "eval": {
            "math_source": {
                "kind": "hub",
                "id": str(tmp_path / "gsm8k" / "main"),
                "split": "test",
                "converter": "gsm8k",
            }
        },
    }


def test_prepare_writes_one_parquet_per_stage_and_a_manifest(raw, tmp_path):
    cfg = parse_config(raw)
    out = tmp_path / "data"
    manifest_path = prepare.prepare(cfg, out)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == prepare.FORMAT and manifest["config"] == "prep"
    expected = {
        "inst": (2, "instruct_skillmix", "instruct_skillmix/1"),
        "tofu": (3, "tofu", "tofu/2"),
        "math": (3, "gsm8k", "gsm8k/2"),
        "U": (14, "sorry_bench", "sorry_bench/2"),
    }
    for stage, (rows, converter, transform) in expected.items():
        entry = manifest["stages"][stage]
        path = out / entry["file"]
        assert (entry["rows"], entry["converter"], entry["transform"]) == (rows, converter, transform)
        assert entry["sha256"] == sha256_file(path) and entry["source_id"] == cfg.stage(stage).source.id
        assert "revision" in entry and entry["kind"] == "hub"
        assert pq.read_schema(path).names == ["messages", "group"]  # group: the eval-sample stratum
        assert read_prepared(path) == hub.load_hub(cfg.stage(stage).source)
    math_eval = manifest["eval"]["math"]
    assert math_eval["rows"] == 2 and read_prepared(out / math_eval["file"])[1]["messages"][1][
        "content"
    ].endswith("#### 13500")
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # temp names were all renamed


def test_a_second_run_reuses_the_local_copy_without_downloading(raw, tmp_path, monkeypatch):
    cfg, out = parse_config(raw), tmp_path / "data"
    first = json.loads(prepare.prepare(cfg, out).read_text())

    def no_network(*args, **kwargs):
        raise AssertionError("prepare downloaded again")

    monkeypatch.setattr(converters, "load_hub_dataset", no_network)  # hub.py calls it through the module
    lines: list[str] = []
    second = json.loads(prepare.prepare(cfg, out, report=lines.append).read_text())
    assert second["stages"] == first["stages"]
    assert all("reused" in line for line in lines) and len(lines) == 5


def test_a_corrupt_copy_or_a_changed_source_is_rebuilt(raw, tmp_path):
    cfg, out = parse_config(raw), tmp_path / "data"
    first = json.loads(prepare.prepare(cfg, out).read_text())["stages"]
    (out / first["tofu"]["file"]).write_bytes(b"not parquet")
    raw["stages"][2]["source"]["n"] = 2
    second = json.loads(prepare.prepare(parse_config(raw), out).read_text())["stages"]
    assert second["tofu"]["sha256"] == first["tofu"]["sha256"]  # rebuilt byte-identical from the source
    assert second["math"]["file"] != first["math"]["file"] and second["math"]["rows"] == 2


def test_lookup_finds_a_prepared_copy_by_source_spec(raw, tmp_path):
    cfg, out = parse_config(raw), tmp_path / "data"
    manifest = json.loads(prepare.prepare(cfg, out).read_text())
    source = cfg.stage("U").source
    assert lookup_prepared(source, out) == out / manifest["stages"]["U"]["file"]
    assert lookup_prepared(source.model_copy(update={"n": 3}), out) is None
    assert lookup_prepared(source, tmp_path / "elsewhere") is None


def test_local_and_synthetic_stages_are_prepared_too(tmp_path):
    local = fx.write_jsonl(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
        tmp_path / "l.jsonl",
    )
    cfg = parse_config(
        {
            "name": "mixed",
            "models": [{"name": "tiny", "source": "builtin:tiny"}],
            "forget_stage": "U",
            "stages": [
                {"name": "A", "source": {"kind": "local", "path": str(local)}},
                {"name": "U", "source": {"kind": "synthetic", "task": "refusal", "n": 5}},
            ],
            "orders": {"explicit": [["A", "U"]]},
            "eval": {"knowledge_stage": None},
        }
    )
    stages = json.loads(prepare.prepare(cfg, tmp_path / "data").read_text())["stages"]
    assert (stages["A"]["rows"], stages["A"]["converter"]) == (1, "local")
    assert stages["A"]["transform"].startswith("local/1+sha256:")
    assert (stages["U"]["rows"], stages["U"]["converter"]) == (5, "synthetic:refusal")


# ---- the CLI entry point: `reteq data prepare`; unavailable or malformed data is bad input (one line, exit 2) ----
def _prepare(*argv: str) -> int:
    return main(["data", "prepare", *argv])


def test_prepare_command_prints_what_it_wrote_and_returns_0(raw, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _prepare(str(path), "--out", str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "U: 14 rows, wrote" in printed and f"manifest: {tmp_path / 'out' / 'manifest.json'}" in printed


def test_prepare_command_defaults_to_work_dir_data(raw, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _prepare(str(path)) == 0
    assert (tmp_path / "work" / "data" / "manifest.json").is_file()


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]  # lines before it are datasets' progress bars


def test_a_gated_source_fails_as_one_line_naming_file_field_and_dataset(raw, tmp_path, capsys):
    raw["stages"][3]["source"] = {"kind": "hub", "id": "sorry-bench/sorry-bench-202503"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _prepare(str(path), "--out", str(tmp_path / "out"), "--allow-unpinned-hub") == EXIT_BAD_INPUT
    err = _last_line(capsys)
    assert err.startswith(
        f"{path}: stages[3].source: cannot load hub dataset 'sorry-bench/sorry-bench-202503'"
    )
    assert "huggingface-cli login" in err


def test_a_malformed_row_fails_naming_the_field_and_row(raw, tmp_path, capsys):
    rows = fx.sorry_rows()
    rows[0] = dict(rows[0], turns=[])
    fx.write_sorry_bench(tmp_path, rows)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _prepare(str(path), "--out", str(tmp_path / "out")) == EXIT_BAD_INPUT
    err = _last_line(capsys)
    assert err.startswith(f"{path}: stages[3].source: ") and ": row 0: turns must be a non-empty list" in err


def test_a_dataset_missing_the_published_columns_is_one_line(raw, tmp_path, capsys):
    no_turns = pa.schema([f for f in fx.SORRY_SCHEMA if f.name != "turns"])
    fx.write_sorry_bench(tmp_path, [{k: v for k, v in r.items() if k != "turns"} for r in fx.sorry_rows()], no_turns)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _prepare(str(path), "--out", str(tmp_path / "out")) == EXIT_BAD_INPUT
    err = _last_line(capsys)
    assert err.startswith(f"{path}: stages[3].source: ") and "missing column(s) ['turns']" in err


def test_a_bad_config_returns_2_with_file_field_reason(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodels: []\nstages: []\norders: {all_permutations: true}\nbogus: 1\n")
    assert _prepare(str(path)) == EXIT_BAD_INPUT
    assert f"{path}: bogus: unknown field" in capsys.readouterr().err


def test_source_key_depends_on_spec_and_transform():
    a = DataSource(kind="hub", id="locuslab/TOFU", subset="full")
    assert prepare.source_key(a) == prepare.source_key(a.model_copy())
    assert prepare.source_key(a) != prepare.source_key(a.model_copy(update={"revision": "abc"}))


def test_a_sweep_reads_the_prepared_copy_instead_of_the_hub(raw, tmp_path, monkeypatch):
    from reteq.pipeline.context import DataCache

    cfg = parse_config(raw)
    prepare.prepare(cfg, tmp_path / "work" / "data")  # the default place: <work_dir>/data
    expected = {s.name: hub.load_hub(s.source) for s in cfg.stages}

    def no_network(*args, **kwargs):
        raise AssertionError("the sweep went to the hub although a prepared copy exists")

    monkeypatch.setattr(converters, "load_hub_dataset", no_network)  # hub.py calls it through the module
    cache = DataCache(cfg)
    assert {s.name: cache.stage(s.name) for s in cfg.stages} == expected


# ---- truncation is visible: rows over max_length are counted per stage, and a share above the limit stops ----
def _long_and_short(tmp_path, frac: float | None) -> str:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(3)]
    rows[1]["messages"][1]["content"] = "word " * 200  # far beyond 64 tokens
    local = fx.write_jsonl(rows, tmp_path / "rows.jsonl")
    stage = {"name": "A", "source": {"kind": "local", "path": str(local)}, "max_length": 64}
    if frac is not None:
        stage["max_truncated_frac"] = frac
    cfg = {"name": "trunc", "work_dir": str(tmp_path / "work"), "models": [{"name": "tiny", "source": "builtin:tiny"}],
           "forget_stage": "U", "orders": {"explicit": [["A", "U"]]}, "eval": {"knowledge_stage": None},
           "stages": [stage, {"name": "U", "source": {"kind": "synthetic", "task": "refusal", "n": 4}}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_prepare_counts_truncated_rows_and_stops_above_the_allowed_share(tmp_path, capsys):
    config = _long_and_short(tmp_path, None)
    assert _prepare(config, "--out", str(tmp_path / "out")) == EXIT_BAD_INPUT
    line = _last_line(capsys)
    assert line.startswith(f"{config}: stages.A.max_length: 1 of 3 rows (33.3%) exceed 64 tokens (longest "), line
    assert line.endswith("above stages.A.max_truncated_frac (0) (model tiny); raise the limit or the share")

    config = _long_and_short(tmp_path, 0.5)
    assert _prepare(config, "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "length: stages.A.max_length = 64, model tiny: 1 of 3 rows (33.3%) exceed 64 tokens (longest " in out
    assert "length: unlearn.max_length = 512, model tiny: 0 of 4 rows (0.0%) exceed 512 tokens" in out


def test_the_preflight_reports_truncation_too_and_the_share_is_not_in_the_keys(tmp_path):
    from reteq.config import load_config
    from reteq.errors import DataError
    from reteq.pipeline.context import DataCache
    from reteq.pipeline.preflight import preflight
    from reteq.plan import build_plan

    lines: list[str] = []
    strict, lenient = load_config(_long_and_short(tmp_path, None)), load_config(_long_and_short(tmp_path, 0.5))
    with pytest.raises(DataError, match=r"^stages.A.max_length: 1 of 3 rows"):
        preflight(strict, DataCache(strict))
    preflight(lenient, DataCache(lenient), report=lines.append)
    assert lines[0].startswith("stages.A.max_length = 64, model tiny: 1 of 3 rows (33.3%) exceed 64 tokens")
    plans = build_plan(strict), build_plan(lenient)
    assert set(plans[0].nodes) == set(plans[1].nodes)  # a check, not a training setting
    assert {leaf.key for leaf in plans[0].leaves} == {leaf.key for leaf in plans[1].leaves}
