"""`reteq run-path --param <method>.<knob>=<value>`: any declared knob of the leaf's method, checked against the
method's declaration (name, bounds, whole numbers) with a one-line error before anything trains; `--beta` is its
alias for `<algorithm>.beta`."""

from __future__ import annotations

import pytest
from helpers import checkpoint_dirs, reteq_cache, sweep_dict, write_config  # noqa: F401  (session fixture)

from reteq.cli import EXIT_BAD_INPUT, main
from reteq.commands.run_path import PathFlags, choose_leaf
from reteq.config import parse_config
from reteq.errors import BadInput

METHODS = ["ga", "npo", "simnpo", "rmu"]


def _cfg(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["unlearn"]["algorithms"] = METHODS
    return parse_config(raw)


@pytest.mark.parametrize("algorithm,flags,params", [
    ("npo", {}, {"beta": 0.5}),
    ("npo", {"params": ("npo.beta=0.9",)}, {"beta": 0.9}),
    ("npo", {"beta": 0.9}, {"beta": 0.9}),  # the alias
    ("rmu", {"params": ("rmu.layer=2", "rmu.coeff=6.5")}, {"layer": 2, "coeff": 6.5, "retain_weight": 0.0}),
    ("simnpo", {"params": ("simnpo.length_norm=1",)}, {"beta": 1.0, "length_norm": 1}),
    ("simnpo", {"params": ("simnpo.length_norm=0",)}, {"beta": 1.0}),  # a later knob at its default: no key change
])
def test_param_sets_the_leafs_knob(tmp_path, algorithm, flags, params):
    leaf, _ = choose_leaf(_cfg(tmp_path), PathFlags(algorithm=algorithm, **flags))
    assert leaf.params == params
    assert {k: type(v) for k, v in leaf.params.items()} == {k: type(v) for k, v in params.items()}  # layer: int


@pytest.mark.parametrize("algorithm,text,message", [
    ("npo", "npo.gamma=1", "--param npo.gamma=1: npo has no knob 'gamma' (its knobs: beta)"),
    ("npo", "simnpo.beta=1", "--param simnpo.beta=1: the leaf runs npo, not simnpo"),
    ("npo", "npo.beta=0", "--param npo.beta=0: npo.beta: must be > 0, got 0"),
    ("npo", "npo.beta=x", "--param npo.beta=x: 'x' is not a number"),
    ("npo", "beta=0.5", "--param beta=0.5: write <method>.<knob>=<value>"),
    ("rmu", "rmu.layer=1.5", "--param rmu.layer=1.5: rmu.layer: takes whole numbers, got 1.5"),
    ("ga", "ga.beta=1", "--param ga.beta=1: ga has no knob 'beta' (its knobs: none)"),
])
def test_a_bad_param_is_refused_naming_flag_and_knob(tmp_path, algorithm, text, message):
    with pytest.raises(BadInput) as caught:
        choose_leaf(_cfg(tmp_path), PathFlags(algorithm=algorithm, params=(text,)))
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.usefixtures("reteq_cache")
def test_the_cli_refuses_a_bad_param_in_one_line_before_training(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["unlearn"]["algorithms"] = METHODS
    config, work = write_config(tmp_path / "sweep.yaml", raw), tmp_path / "work"
    rc = main(["run-path", str(config), "--work-dir", str(work), "--algorithm", "npo", "--param", "npo.beta=-1"])
    captured = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT, captured
    assert captured.err.splitlines() == [captured.err.strip()] and "--param npo.beta=-1" in captured.err
    assert "[stage]" not in captured.out and not work.exists() and checkpoint_dirs(work) == []
