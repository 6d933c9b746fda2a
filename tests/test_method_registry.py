"""What each unlearning method declares (knobs, needs, normalisation) is what the registry holds and what
docs/methods.md lists; `register` refuses a declaration the loop could not serve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from reteq.algorithms import ALGORITHMS, RETAIN_WEIGHT, MethodInputs, Need, get_algorithm, register

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods.md"

# name -> (knobs with defaults, needs, normalisation): what each method declares
DECLARED = {
    "ga": ({}, set(), "token"),
    "npo": ({"beta": 0.5}, {Need.REF_LOGPS}, "sequence"),
    "simnpo": ({"beta": 1.0}, set(), "sequence"),
    "wga": ({"beta": 1.0}, {Need.TOKEN_LOGPS}, "token"),
    "satimp": ({"beta1": 5.0, "beta2": 1.0}, {Need.TOKEN_LOGPS}, "token"),
    "undial": ({"strength": 10.0}, {Need.LOGITS, Need.REF_LOGITS}, "token"),
    "ceu": ({"ignore_first": 1}, {Need.LOGITS}, "token"),
    "me": ({}, {Need.LOGITS}, "token"),
    "idknll": ({}, {Need.ALTERNATIVE}, "sequence"),
    "idkdpo": ({"beta": 0.1}, {Need.ALTERNATIVE, Need.REF_LOGPS}, "sequence"),
    "rmu": ({"layer": 1, "coeff": 20.0, RETAIN_WEIGHT: 0.0}, {Need.HIDDEN, Need.RETAIN}, "token"),
    "graddiff": ({RETAIN_WEIGHT: 0.0}, {Need.RETAIN}, "token"),
    "npo_retain": ({"beta": 0.5, RETAIN_WEIGHT: 0.0}, {Need.REF_LOGPS, Need.RETAIN}, "sequence"),
}

# ---- the registry ---------------------------------------------------------------------------------------------------

def test_every_method_is_registered_with_what_it_declares():
    assert set(ALGORITHMS) == set(DECLARED)
    for name, (knobs, needs, normalisation) in DECLARED.items():
        alg = ALGORITHMS[name]
        assert dict(alg.defaults) == knobs, name
        assert {k: type(v) for k, v in alg.defaults.items()} == {k: type(v) for k, v in knobs.items()}, name
        assert alg.needs == frozenset(needs), name
        assert alg.normalisation == normalisation, name
        assert alg.source and alg.summary, name
        assert alg.needs_reference == bool(needs & {Need.REF_LOGPS, Need.REF_LOGITS}), name
    assert isinstance(ALGORITHMS["ceu"].defaults["ignore_first"], int)  # whole-number knobs
    assert isinstance(ALGORITHMS["rmu"].defaults["layer"], int)
    # hidden_states has layers + 1 entries: the default layer exists on the tiny model (2) and SmolLM2-135M (30)
    assert 0 < ALGORITHMS["rmu"].defaults["layer"] < 2


def test_every_method_needs_what_its_loss_reads():
    """A declared need withheld is a clear error naming the method, not a None deep in torch."""
    for name, (knobs, needs, _) in DECLARED.items():
        if not needs - {Need.RETAIN}:
            continue
        with pytest.raises(ValueError, match=name):
            get_algorithm(name).loss(MethodInputs.of_sequences(torch.zeros(2, dtype=torch.float64)),
                                     dict(knobs))


@pytest.mark.parametrize("kwargs,message", [
    ({"defaults": {"lr": 1.0}}, "reserved"),
    ({"defaults": {"seed": 1, "beta": 1.0}}, "reserved"),
    ({"needs": {Need.RETAIN}}, "retain_weight"),
    ({"defaults": {"layer": 1}, "needs": {Need.RETAIN}}, "retain_weight"),
    ({"needs": {Need.HIDDEN}}, "'layer'"),
    ({"defaults": {RETAIN_WEIGHT: 0.0}, "needs": {Need.HIDDEN, Need.RETAIN}}, "'layer'"),
    ({"normalisation": "batch"}, "normalisation"),
])
def test_register_rejects_a_bad_declaration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        register("not_a_method", **kwargs)
    assert "not_a_method" not in ALGORITHMS


# ---- docs/methods.md ------------------------------------------------------------------------------------------------

def docs_problems(text: str, algorithms) -> list[str]:
    """What docs/methods.md's table lacks: a row per method (`| \\`name\\` |`), each of its knobs in that row."""
    rows = {m.group(1): line for line in text.splitlines()
            if (m := re.match(r"\|\s*`([a-z0-9_]+)`\s*\|", line))}
    problems = []
    for name, alg in algorithms.items():
        if name not in rows:
            problems.append(f"no row for {name}")
            continue
        problems += [f"{name}: knob {k} missing" for k in alg.knobs if f"`{k}" not in rows[name]]
        problems += [f"{name}: need {n.value} missing" for n in alg.needs if n.value not in rows[name]]
        if alg.normalisation not in rows[name]:
            problems.append(f"{name}: normalisation missing")
    return problems


def test_docs_list_every_method_and_knob():
    assert docs_problems(DOCS.read_text(), ALGORITHMS) == []


def test_docs_check_fails_for_a_method_without_a_row():
    def fake(x, params):
        """Fake: a method added without its docs row."""
        return x.seq_logp.sum()

    try:
        register("fake_undocumented", defaults={"gamma": 1.0})(fake)
        assert docs_problems(DOCS.read_text(), ALGORITHMS) == ["no row for fake_undocumented"]
    finally:
        ALGORITHMS.pop("fake_undocumented", None)
    # and a knob missing from a row
    text = DOCS.read_text().replace("`beta1`", "beta one")
    assert "satimp: knob beta1 missing" in docs_problems(text, ALGORITHMS)
