"""ZeRO-3 on real DeepSpeed (2 gloo processes, every tensor partitioned): checkpoints are gathered before they
are saved, reproduce the trained model's logits, and an ungathered (empty) save is refused, never published;
a checkpoint is loaded partitioned (zero.Init through transformers' HfDeepSpeedConfig) and saves back the same."""

from __future__ import annotations

import pytest
from distributed import run_ranks
from helpers import reteq_cache  # noqa: F401

pytestmark = pytest.mark.usefixtures("reteq_cache")


@pytest.fixture
def zero3_lora(zero3_two_ranks):
    return zero3_two_ranks


def test_every_adapter_tensor_is_partitioned_with_threshold_0(zero3_lora):
    for rank in zero3_lora:
        assert rank["trainable"] > 0 and rank["empty_shards"] == rank["trainable"]


def test_gathered_checkpoint_reproduces_the_trained_logits(zero3_lora):
    main = zero3_lora[0]
    assert main["training_moved_logits"] > 1e-3  # the round trip is not just the base model again
    assert main["round_trip_diff"] < 1e-5


def test_an_ungathered_save_is_refused_and_not_published(zero3_lora):
    main = zero3_lora[0]
    assert main["refused"] and "zero-size" in main["refused"]
    assert main["ungathered_published"] is False


def test_a_whole_leaf_runs_under_zero3(zero3_lora):
    assert all(rank["leaf_steps"] == 2 for rank in zero3_lora)


def test_a_checkpoint_loaded_partitioned_saves_back_the_same_logits(tmp_path):
    """Load under ZeRO-3 (threshold 0): every base weight is a shard from the start, never whole on a rank; the
    engine's forward and the gathered re-save both reproduce the published checkpoint's logits."""
    ranks = run_ranks("dist_jobs:zero3_partitioned_load", 2, tmp_path / "run", threshold=0,
                      lora={"r": 4, "alpha": 8})
    for rank in ranks:
        assert rank["partitioned"] and rank["base_params"] > 0
        assert rank["base_partitioned_at_load"] == rank["base_params"] and rank["base_elements"] > 10**5
    assert ranks[0]["engine_diff"] < 1e-5 and ranks[0]["round_trip_diff"] < 1e-5
