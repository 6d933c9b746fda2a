"""No code runs from a mid-stage checkpoint (docs/security.md, reteq.sweep.stage_resume).

DeepSpeed's state files are pickles that DeepSpeed itself loads with `torch.load(weights_only=False)`, from
`execution.storage_path`. A planted pickle that would write a marker file is refused in one line before anything
is deserialised (its bytes do not match the digest MLflow recorded when the checkpoint was saved), and reteq's
weights-only loader refuses it even when it is handed over directly. A verified checkpoint (ZeRO-2, two real
gloo ranks) still round-trips: the resumed engine takes the same step the uninterrupted one did.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from distributed import run_ranks

from reteq import tracking as T
from reteq.errors import CheckpointError
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.sweep.stage_resume import (
    RESUME_FILE,
    ParentRunParams,
    StageResume,
    WeightsOnlyLoads,
    file_digests,
    load_deepspeed_state,
    verify_stage_checkpoint,
)

KEY = "node-key-0123456789abcdef"


class _Payload:
    """Unpickling this runs `exec(code)`: the shape of a hostile pickle."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"module": _Payload(f"open({str(marker)!r}, 'w').write('ran')")}, path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ZeRO-2 mid-stage checkpoint saved by two ranks, its digest in a real MLflow parent run, and the ranks'
    weights after the uninterrupted and the resumed third step."""
    tmp = tmp_path_factory.mktemp("stage-ckpt")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    exp = ensure_experiment(uri, "ckpt", str(tmp / "artifacts"))
    run_id = tracking_client(uri).create_run(exp, tags={T.TAG_KIND: T.KIND_SWEEP}).info.run_id
    ranks = run_ranks("dist_jobs:stage_checkpoint_round_trip", 2, tmp / "run", timeout=300, uri=uri, run_id=run_id)
    return tmp / "run" / "ckpt", ParentRunParams(uri, run_id), ranks


def test_a_verified_checkpoint_resumes_weights_only(saved):
    folder, digests, ranks = saved
    assert all(r["step"] == 2 and r["loaded_engine"] == "WeightsOnlyLoads" for r in ranks)
    for r in ranks:  # the optimizer state and the schedule came back: the resumed third step is the same
        assert r["b"] == pytest.approx(r["a"], abs=1e-6)
    assert verify_stage_checkpoint(folder, KEY, digests) == 2
    assert verify_stage_checkpoint(folder, "another-node", digests) == 0  # not this node's: not loaded
    assert any(n.startswith("stage/zero_pp_rank_1") for n in file_digests(folder))  # both ranks' shards listed


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_a_planted_pickle_is_refused_in_one_line_and_never_runs(saved, tmp_path, capsys):
    folder, digests, _ = saved
    marker = tmp_path / "marker"
    live = tmp_path / "live.pt"  # the planted pickle is live: torch.load(weights_only=False) runs it
    _plant(live, tmp_path / "proof")
    torch.load(live, weights_only=False)
    assert (tmp_path / "proof").read_text() == "ran"

    bad = _copy(folder, tmp_path / "bad")
    _plant(bad / "stage" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"stage/mp_rank_00_model_states.pt is missing or changed"):
        verify_stage_checkpoint(bad, KEY, digests)
    with pytest.raises(CheckpointError):  # refused before the engine is touched (None would fail on use)
        load_deepspeed_state(None, bad, KEY, digests)
    assert StageResume.checked_step(bad, KEY, 0, digests) == 0  # a retried group starts from the parent instead
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"node {KEY[:8]}: refusing its Ray Train checkpoint (step 2:")
    assert lines[0].endswith("training the node from its parent")

    # a planted file DeepSpeed would read, beside the listed ones
    extra = _copy(folder, tmp_path / "extra")
    _plant(extra / "stage" / "mp_rank_01_model_states.pt", marker)
    with pytest.raises(CheckpointError, match="not in the checkpoint's recorded manifest"):
        verify_stage_checkpoint(extra, KEY, digests)

    # whoever can write the checkpoint rewrites resume.json to list the planted file: MLflow's digest disagrees
    forged = _copy(folder, tmp_path / "forged")
    _plant(forged / "stage" / "mp_rank_00_model_states.pt", marker)
    import json

    meta = json.loads((forged / RESUME_FILE).read_text())
    meta["files"] = file_digests(forged)
    (forged / RESUME_FILE).write_text(json.dumps(meta, sort_keys=True))
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded in MLflow"):
        verify_stage_checkpoint(forged, KEY, digests)
    (forged / RESUME_FILE).write_text(json.dumps({**meta, "nonce": "0"}, sort_keys=True))
    with pytest.raises(CheckpointError, match="no digest was recorded in MLflow"):
        verify_stage_checkpoint(forged, KEY, digests)

    # and handed straight to the loader DeepSpeed uses, the pickle is refused by weights_only
    class Inner:
        pass

    with pytest.raises(Exception, match="Weights only load failed"):
        WeightsOnlyLoads(Inner()).load(str(forged / "stage" / "mp_rank_00_model_states.pt"))
    assert not marker.exists()


def test_a_checkpoint_reteq_did_not_write_is_refused(tmp_path, saved):
    _, digests, _ = saved
    (tmp_path / "stage").mkdir()
    _plant(tmp_path / "stage" / "mp_rank_00_model_states.pt", tmp_path / "marker")
    with pytest.raises(CheckpointError, match=f"no {RESUME_FILE}"):
        verify_stage_checkpoint(tmp_path, KEY, digests)
    (tmp_path / RESUME_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a resume record"):
        verify_stage_checkpoint(tmp_path, KEY, digests)
    assert not (tmp_path / "marker").exists()
