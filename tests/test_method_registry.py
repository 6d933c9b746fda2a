"""A method is its pair of files, found by name: `<name>_config.py` declares it without torch, `<name>.py` holds its
loss. The tables here are derived from the registry, never restated; docs/methods.md's tables are generated from
the declarations; planning and config validation load no torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import reteq.algorithms as algorithms
from reteq.algorithms import (
    ALGORITHMS,
    RETAIN_TOKEN_MEAN,
    RETAIN_WEIGHT,
    Knob,
    Method,
    Need,
    discover,
    docs,
    get_algorithm,
    load_losses,
)
from reteq.algorithms.base import MethodInputs
from reteq.config_protocol import UnlearnConfig

INFRASTRUCTURE = {"base", "method", "docs"}  # the package's own modules: neither a declaration nor a loss


# ---- discovery --------------------------------------------------------------------------------------------------

def test_every_declaration_has_its_loss_and_every_loss_its_declaration():
    modules = {i.name for i in pkgutil.iter_modules(algorithms.__path__)} - INFRASTRUCTURE
    declared = {m[: -len("_config")] for m in modules if m.endswith("_config")}
    assert set(ALGORITHMS) == declared and len(declared) >= 13
    assert modules == declared | {f"{n}_config" for n in declared}  # no loss file without a declaration
    losses = load_losses()
    assert set(losses) == declared
    for name, alg in losses.items():
        assert alg.loss.__module__ == f"reteq.algorithms.{name}", name  # the loss lives in <name>.py
        assert {f: getattr(alg, f) for f in ("knobs", "needs", "normalisation", "source")} == \
            {f: getattr(ALGORITHMS[name], f) for f in ("knobs", "needs", "normalisation", "source")}


def test_adding_a_method_is_adding_its_file(tmp_path, monkeypatch):
    """discover() picks a new `<name>_config.py` up with nothing else edited, and refuses a misnamed one."""
    package = tmp_path / "fake_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "gamma_ascent_config.py").write_text(textwrap.dedent('''
        from reteq.algorithms.method import Knob, Method
        METHOD = Method("gamma_ascent", summary="s", formula="`f`", source="nobody",
                        knobs={"gamma": Knob(1.0, 0.0)})
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover([str(package)], "fake_methods")
    assert list(found) == ["gamma_ascent"] and found["gamma_ascent"].defaults == {"gamma": 1.0}
    (package / "misnamed_config.py").write_text(textwrap.dedent('''
        from reteq.algorithms.method import Method
        METHOD = Method("other", summary="s", formula="`f`", source="nobody")
    '''))
    with pytest.raises(ValueError, match=r"misnamed_config.py: declare METHOD = Method\('misnamed'"):
        discover([str(package)], "fake_methods")


def test_planning_and_config_load_no_torch():
    """A planning process (the driver, `reteq plan`) imports no torch: a fresh interpreter proves it, and the same
    probe sees torch once a loss module is imported (so it can fail)."""
    probe = "import sys, {}; print('torch' in sys.modules)"
    run = [sys.executable, "-c"]
    clean = subprocess.run(run + [probe.format("reteq.plan, reteq.config, reteq.algorithms.docs")],
                           capture_output=True, text=True, check=True)
    assert clean.stdout.strip() == "False", clean.stderr
    loaded = subprocess.run(run + [probe.format("reteq.plan, reteq.algorithms.npo")],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "True"


# ---- declarations ----------------------------------------------------------------------------------------------

def test_declarations_keep_the_papers_defaults():
    """What leaf keys were recorded with (keys hash a leaf's knobs): the paper's betas, RMU's layer on the tiny
    model (2 layers) and SmolLM2-135M (30), every retain term off, every later knob off."""
    assert (ALGORITHMS["npo"].default_beta, ALGORITHMS["simnpo"].default_beta) == (0.5, 1.0)
    assert not ALGORITHMS["ga"].knobs and ALGORITHMS["ga"].normalisation == "token"
    assert 0 < ALGORITHMS["rmu"].defaults["layer"] < 2 and isinstance(ALGORITHMS["rmu"].defaults["layer"], int)
    for m in ALGORITHMS.values():
        assert m.summary and m.formula and m.source, m.name
        assert m.reads_retain == (Need.RETAIN in m.needs) and not m.reads_retain_at(m.defaults), m.name
        assert all(knob.default == 0 for knob in m.knobs.values() if knob.later), m.name
        assert m.keyed(m.defaults) == {k: v for k, v in m.defaults.items() if not m.knobs[k].later}, m.name


def test_every_method_needs_what_its_loss_reads():
    """A declared need withheld is a clear error naming the method, not a None deep in torch."""
    for name, m in ALGORITHMS.items():
        if not m.needs - {Need.RETAIN}:
            continue
        with pytest.raises(ValueError, match=name):
            get_algorithm(name).loss(MethodInputs.of_sequences(torch.zeros(2, dtype=torch.float64)), m.defaults)


GOOD = {"summary": "s", "formula": "`f`", "source": "nobody"}


@pytest.mark.parametrize("kwargs,message", [
    ({"knobs": {"lr": Knob(1.0)}}, "reserved"),
    ({"knobs": {"seed": Knob(1), "beta": Knob(1.0)}}, "reserved"),
    ({"needs": {Need.RETAIN}}, "retain_weight"),
    ({"knobs": {RETAIN_WEIGHT: Knob(0.0)}, "needs": {Need.RETAIN}}, RETAIN_TOKEN_MEAN),
    ({"needs": {Need.HIDDEN}}, "'layer'"),
    ({"normalisation": "batch"}, "normalisation"),
    ({"knobs": {"beta": Knob(0.0, 0.0, low_open=True)}}, "its default 0.0 must be > 0"),
    ({"summary": ""}, "summary, formula and source"),
])
def test_a_bad_declaration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Method("not_a_method", **{**GOOD, **kwargs})


@pytest.mark.parametrize("params,message", [
    ({"npo": {"beta": [0.5, 0.0]}}, "npo.beta: must be > 0, got 0"),
    ({"simnpo": {"length_norm": [2]}}, "simnpo.length_norm: must be <= 1, got 2"),
    ({"graddiff": {RETAIN_WEIGHT: [-1.0]}}, "graddiff.retain_weight: must be >= 0, got -1"),
    ({"ceu": {"ignore_first": [1.5]}}, "ceu.ignore_first: takes whole numbers, got 1.5"),
    ({"npo": {"gamma": [1.0]}}, "npo has no knob 'gamma' (its knobs: beta)"),
])
def test_a_knob_outside_its_bounds_is_refused_in_one_line(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        UnlearnConfig(algorithms=sorted(params), params=params)


def test_a_later_knob_enters_a_leaf_only_away_from_its_default():
    """Keys recorded before `length_norm`, `batch_token_mean`, `retain_token_mean` existed stay the same."""
    u = UnlearnConfig(algorithms=["simnpo", "graddiff"], params={"graddiff": {RETAIN_WEIGHT: [0.0, 1.0]}})
    assert u.knob_grid("simnpo") == [{"beta": 1.0}]
    assert u.knob_grid("graddiff") == [{RETAIN_WEIGHT: 0.0}, {RETAIN_WEIGHT: 1.0}]
    on = UnlearnConfig(algorithms=["simnpo"], params={"simnpo": {"length_norm": [0, 1]}})
    assert on.knob_grid("simnpo") == [{"beta": 1.0}, {"beta": 1.0, "length_norm": 1}]


# ---- docs/methods.md ------------------------------------------------------------------------------------------------

def test_docs_tables_are_the_generated_ones():
    """Fails when a declaration changes and `python -m reteq.algorithms.docs --write` was not run (or the block
    was edited by hand)."""
    assert docs.current(docs.DOCS.read_text()) == docs.generated()


def test_the_docs_check_sees_a_planted_difference():
    text = docs.DOCS.read_text()
    assert docs.current(text.replace("| `wga` | `beta` | 1.0 |", "| `wga` | `beta` | 2.0 |")) != docs.generated()
    changed = {**ALGORITHMS, "npo": replace(ALGORITHMS["npo"], source="someone else")}
    assert docs.current(text) != docs.generated(changed)
    added = {**ALGORITHMS, "zz": Method("zz", **GOOD)}
    assert "| `zz` | `f` | none | none | sequence | nobody |" in docs.generated(added)
    assert docs.current(text.replace(docs.END, "")) == ""  # a broken block is no block


def test_the_generator_writes_the_block(tmp_path, monkeypatch):
    page = tmp_path / "methods.md"
    page.write_text(f"intro\n{docs.BEGIN}\nstale\n{docs.END}\noutro\n")
    monkeypatch.setattr(docs, "DOCS", page)
    assert docs.main(["--write"]) == 0
    assert page.read_text() == f"intro\n{docs.generated()}\noutro\n"
    page.write_text("no block\n")
    assert docs.main(["--write"]) == 2


def test_the_docs_module_is_runnable():
    out = subprocess.run([sys.executable, "-m", "reteq.algorithms.docs"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == docs.generated()
