"""Same numbers on any number of workers: one order's stage nodes and three leaves (GA, NPO, and WGA, a token-level
method) at the same global batch, trained by 1 worker accumulating 2 micro-batches (in process with plain torch
under ZeRO-0, as the sweep runs it; a 1-worker Ray Train group under ZeRO-2 and 3) and by 2 Ray Train workers
(gloo) under ZeRO 0, 2 and 3 (ZeRO-3 with every tensor partitioned) and plain torch, agree within
reteq.sweep.worlds.TOLERANCE: every per-step loss and every eval metric. Bitwise equality is not claimed: a gradient
all-reduce adds in another order than accumulation does (fp32). LoRA carries dropout, so a micro-batch's masks must
not depend on which worker draws them. Checkpoints cross worker counts: a 2-worker leaf reads a 1-worker node's
checkpoint and a 1-worker leaf a 2-worker (ZeRO-3, gathered) one, with the same results.

One TorchTrainer per worker count runs every ZeRO stage in turn, the two side by side (a worker group's start-up
is most of the cost); the measured differences are printed (docs/cluster.md, "Results across worker counts",
records them)."""

from __future__ import annotations

import copy
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import reteq_cache  # noqa: F401
from safetensors.torch import load_file

from reteq.config import parse_config
from reteq.config_files import read_yaml_mapping
from reteq.sweep.remote import trace_with_ray_train
from reteq.sweep.worlds import TOLERANCE, differences, largest, trace
from reteq.train.worker_context import WorkerContext

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("reteq_cache")]

REPO = Path(__file__).resolve().parent.parent
ZEROS = (0, 2, 3)
METHODS = ("ga", "npo", "wga")
CROSS = "npo"  # the leaf run from the other worker count's checkpoints (it also recomputes its reference there)


def deepspeed(zero: int) -> dict:
    ds = json.loads((REPO / "configs" / "deepspeed" / f"zero{zero}_fp32.json").read_text())
    if zero == 3:  # partition every tensor of the tiny model (the default threshold keeps them whole)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def config(work: Path):
    """configs/ablations/workers_tiny.yaml: order tofu > U (two stage nodes, tofu also theta_r), LoRA with
    dropout, GA / NPO / WGA for 2 steps at a global batch of 8 in micro-batches of 4; forget, TOFU and
    retrain-distance metrics at every step."""
    raw = read_yaml_mapping(REPO / "configs" / "ablations" / "workers_tiny.yaml")
    raw["work_dir"] = str(work)
    raw["execution"]["deepspeed"] = None  # each job names its own
    return parse_config(raw)


def job(root: Path, world: int, zero: int | None, name: str = "", **extra) -> dict:
    """One trace's settings for reteq.sweep.remote.trace_with_ray_train, in its own folder; zero None: plain
    torch (deepspeed: null)."""
    where = root / f"w{world}-zero{zero}{name}"
    where.mkdir(parents=True)
    return {"ds": None if zero is None else deepspeed(zero), "store": str(where / "store"),
            "out": str(where / "trace.json"), **extra}


def copy_store(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def worlds(ray_cluster, tmp_path_factory):
    """{(world, zero): trace} for 1 and 2 workers under ZeRO 0, 2, 3, plus (2, "plain"): 2 plain torch workers
    (deepspeed: null), ("cross", 2): 2 workers' NPO leaf from the 1-worker ZeRO-0 nodes, and ("cross", 1):
    1 worker's from the 2-worker ZeRO-3 nodes.

    1 worker under ZeRO-0 runs here, in process with plain torch, as the sweep runs it (reteq.sweep.process.
    in_process); then the 1-worker group (ZeRO-2, 3) and the 2-worker group (ZeRO-0, 2, 3 and the cross leaf)
    run side by side, each one TorchTrainer: a worker group's start-up is most of the cost."""
    root = tmp_path_factory.mktemp("worlds")
    cfg = config(root / "work")
    plain = job(root, 1, 0)
    traces = {(1, 0): trace(cfg, WorkerContext(packing=cfg.execution.packing), plain["store"])}
    one = [job(root, 1, z) for z in ZEROS[1:]]
    cross = job(root, 2, 0, name="cross", algorithms=[CROSS])
    cross["store"] = copy_store(plain["store"], cross["store"])
    two = [job(root, 2, z) for z in ZEROS] + [cross, job(root, 2, None)]
    with ThreadPoolExecutor(2) as pool:
        groups = [pool.submit(trace_with_ray_train, cfg, n, jobs, root / "ray", f"w{n}") for n, jobs in
                  ((1, one), (2, two))]
        done_one, done_two = (g.result() for g in groups)
    traces.update(zip([(1, z) for z in ZEROS[1:]], done_one, strict=True))
    traces.update(zip([(2, z) for z in ZEROS] + [("cross", 2), (2, "plain")], done_two, strict=True))
    store = copy_store(two[2]["store"], str(root / "cross1-store"))
    traces[("cross", 1)] = trace(cfg, WorkerContext(packing=cfg.execution.packing), store, [CROSS])
    traces["stores"] = {(1, 0): plain["store"]} | {(1, z): one[i]["store"] for i, z in enumerate(ZEROS[1:])} | {
        (2, z): two[i]["store"] for i, z in enumerate(ZEROS)}
    return traces


def report(name: str, diffs: dict[str, float]) -> None:
    print(f"\n{name}: largest {largest(diffs)[0]} {largest(diffs)[1]:.2e}; "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_the_traces_are_real_work(worlds):
    """Every trace trained two nodes and three leaves that moved (a trace of nothing agrees with anything), on
    the engine the sweep would use: plain torch for one CPU worker under ZeRO-0, DeepSpeed otherwise."""
    for (world, zero) in [(w, z) for w in (1, 2) for z in ZEROS]:
        t = worlds[(world, zero)]
        assert t["world"] == world and t["zero"] == (zero if t["engine"] == "deepspeed" else 0)
        assert t["engine"] == ("torch" if (world, zero) == (1, 0) else "deepspeed")
        assert len(t["nodes"]) == 2 and all(len(n["losses"]) == 2 for n in t["nodes"].values())
        assert sorted(leaf["algorithm"] for leaf in t["leaves"].values()) == sorted(METHODS)
        for leaf in t["leaves"].values():
            assert len(leaf["losses"]) == 2 and sorted(leaf["evals"]) == ["0", "1", "2"]
            assert {"forget/score", "utility/tofu_logp", "re/logp_mse"} <= leaf["evals"]["2"].keys()
            assert abs(leaf["evals"]["2"]["forget/score"]) > 10 * TOLERANCE  # unlearning moved the model


@pytest.mark.parametrize("zero", ZEROS)
def test_one_and_two_workers_agree(worlds, zero):
    diffs = differences(worlds[(1, zero)], worlds[(2, zero)])
    report(f"ZeRO-{zero}, 1 vs 2 workers", diffs)
    assert {"loss/ga", "loss/npo", "loss/wga", "forget/score", "utility/tofu_logp", "re/logp_mse"} <= diffs.keys()
    assert len([k for k in diffs if k.startswith("loss/tiny")]) == 2  # both nodes compared
    assert largest(diffs)[1] <= TOLERANCE, diffs


def test_two_plain_torch_workers_sum_their_gradients(worlds):
    """deepspeed: null with 2 workers: PlainEngine all-reduces the gradients (each rank alone would step on half
    the batch, and rank 0 would publish its half-trained model)."""
    plain = worlds[(2, "plain")]
    assert plain["engine"] == "torch" and plain["world"] == 2
    diffs = differences(worlds[(1, 0)], plain)
    report("plain torch, 1 vs 2 workers", diffs)
    assert largest(diffs)[1] <= TOLERANCE, diffs


def test_every_zero_stage_and_worker_count_agree_with_one_plain_worker(worlds):
    base = worlds[(1, 0)]
    worst = {f"{w} workers, ZeRO-{z}": largest(differences(base, worlds[(w, z)])) for w in (1, 2) for z in ZEROS}
    print("\nagainst 1 worker, plain torch:", worst)
    assert all(d <= TOLERANCE for _, d in worst.values()), worst


def test_node_checkpoints_agree_across_worker_counts(worlds):
    """The published tensors themselves (ZeRO-3's gathered from 2 ranks' shards): same names, shapes, values."""
    for zero in ZEROS:
        a, b = (Path(worlds["stores"][(w, zero)]) for w in (1, 2))
        keys = sorted(p.name for p in a.iterdir())
        assert keys == sorted(p.name for p in b.iterdir()) and len(keys) == 2
        for key in keys:
            ta = {k: v for f in sorted((a / key).glob("*.safetensors")) for k, v in load_file(f).items()}
            tb = {k: v for f in sorted((b / key).glob("*.safetensors")) for k, v in load_file(f).items()}
            assert ta.keys() == tb.keys() and ta
            assert all(ta[k].shape == tb[k].shape and ta[k].numel() > 0 for k in ta)
            assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= TOLERANCE


def test_a_two_worker_leaf_reads_one_worker_checkpoints(worlds):
    cross = worlds[("cross", 2)]
    assert cross["nodes"] == {} and [leaf["algorithm"] for leaf in cross["leaves"].values()] == [CROSS]
    for theirs in (worlds[(1, 0)], worlds[(2, 0)]):
        diffs = differences(theirs, cross, partial=True)
        report("2-worker leaf from 1-worker nodes", diffs)
        assert largest(diffs)[1] <= TOLERANCE, diffs


def test_a_one_worker_leaf_reads_two_worker_zero3_checkpoints(worlds):
    cross = worlds[("cross", 1)]
    assert cross["nodes"] == {} and cross["engine"] == "torch"
    for theirs in (worlds[(2, 3)], worlds[(1, 0)]):
        diffs = differences(theirs, cross, partial=True)
        report("1-worker leaf from 2-worker ZeRO-3 nodes", diffs)
        assert largest(diffs)[1] <= TOLERANCE, diffs


def test_differences_take_the_largest_per_quantity_and_refuse_what_one_trace_lacks():
    a = {"nodes": {"n": {"label": "tiny U", "losses": [1.0, 2.0]}},
         "leaves": {"l": {"label": "ga U", "algorithm": "ga", "losses": [0.5, 0.25],
                          "evals": {"0": {"forget/score": 0.0}, "2": {"forget/score": 1.0}}}}}
    b = copy.deepcopy(a)
    b["nodes"]["n"]["losses"][1] = 2.25
    b["leaves"]["l"]["evals"]["2"]["forget/score"] = 1.5
    assert differences(a, b) == {"forget/score": 0.5, "loss/ga": 0.0, "loss/tiny U": 0.25}
    assert largest(differences(a, b)) == ("forget/score", 0.5)
    fewer = copy.deepcopy(b)
    fewer["nodes"] = {}
    assert differences(a, fewer, partial=True) == {"forget/score": 0.5, "loss/ga": 0.0}
    for broken in (fewer, {**b, "leaves": {"l": {**b["leaves"]["l"], "losses": [0.5]}}},
                   {**b, "leaves": {"l": {**b["leaves"]["l"], "evals": {"0": {"forget/score": 0.0}}}}}):
        with pytest.raises(ValueError):
            differences(a, broken)
