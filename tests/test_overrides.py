"""`--set FIELD=VALUE`: a slice of a design from the command line, with the leaf keys the whole design gives it.

The point of the flag is that a slice (fewer seeds, methods or lrs) run today is part of the whole design run
later: the sweep reuses every leaf whose key it finds, so the slice's keys must be the design's. Bad flags are
one line naming `--set FIELD`, exit 2, before anything is planned.
"""

from __future__ import annotations

import pytest
from helpers import sweep_dict, write_config

from reteq.cli import EXIT_BAD_INPUT, main
from reteq.config import load_config
from reteq.config_files import MAX_OVERRIDES
from reteq.plan import build_plan

ROOT_CONFIG = "configs/smol_science.yaml"


def test_a_slice_of_the_science_design_has_the_design_s_own_leaf_keys():
    whole = build_plan(load_config(ROOT_CONFIG))
    part = build_plan(load_config(ROOT_CONFIG, overrides=("seeds=[0,1]", "unlearn.algorithms=[ga,npo,simnpo]",
                                                           "unlearn.lrs=[3.0e-4]")))
    whole_leaves = {leaf.key for leaf in whole.leaves}
    part_leaves = {leaf.key for leaf in part.leaves}
    assert len(part_leaves) == 2 * 4 * 3 * 1 and part_leaves < whole_leaves
    assert set(part.nodes) < set(whole.nodes)


def test_set_reaches_lists_and_creates_a_missing_mapping(tmp_path):
    raw = sweep_dict(tmp_path)
    raw.pop("eval", None)
    config = write_config(tmp_path / "sweep.yaml", raw)
    cfg = load_config(config, overrides=("stages.0.lr=5.0e-5", "eval.dtype=bf16", "seeds=[7]"))
    assert cfg.stages[0].lr == 5.0e-5 and cfg.eval.dtype == "bf16" and cfg.seeds == [7]
    assert load_config(config).stages[0].lr != 5.0e-5  # the file is read again, not changed


@pytest.mark.parametrize("flag,reason", [
    ("seeds", "expected FIELD=VALUE"),
    ("stages.9.lr=1", "--set stages.9.lr: '9' is not an item of a list of"),
    ("unlearn.lrz=1", "(with --set unlearn.lrz): unlearn.lrz: "),
    ("seeds=[0,x]", "(with --set seeds): seeds"),
    ("seeds=[1", "--set seeds: value is not valid YAML"),
    ("name.x=1", "--set name.x: 'x' is inside a str"),
], ids=["no-equals", "list-index", "unknown-field", "bad-value", "bad-yaml", "inside-a-scalar"])
def test_a_bad_set_is_one_line_naming_it(tmp_path, capsys, flag, reason):
    config = write_config(tmp_path / "sweep.yaml", sweep_dict(tmp_path))
    assert main(["validate", str(config), "--set", flag]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(config)) and reason in lines[0], lines


def test_set_is_bounded(tmp_path, capsys):
    config = write_config(tmp_path / "sweep.yaml", sweep_dict(tmp_path))
    flags = [arg for i in range(MAX_OVERRIDES + 1) for arg in ("--set", f"seeds=[{i}]")]
    assert main(["plan", str(config), *flags]) == EXIT_BAD_INPUT
    assert f"at most {MAX_OVERRIDES} --set flags" in capsys.readouterr().err
    nested = "{a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdef", "bcdefg")) + "}"
    assert main(["validate", str(config), "--set", f"extra={nested}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--set extra: refused:" in err and len(err.splitlines()) == 1, err  # an alias bomb through a flag
