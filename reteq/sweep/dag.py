"""The driver's view of the DAG while Tune runs: which nodes are published or failed, which leaves may start.

`NodeWatch.poll` asks Ray which node refs resolved (remote.settled: never blocks the Tune loop) and
prints one line per node. `DagSearcher` is a Tune Searcher that hands out a leaf's axes only once every node
it depends on is published, so no trial is ever RUNNING (or holding resources) before its parent exists; a leaf
under a failed node is never started and is recorded as skipped, naming the node. It returns
`Searcher.FINISHED` when every leaf was handed out or skipped. `ConsoleLines` polls once per Tune loop step and
prints one line per finished or failed trial.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

from reteq import tracking as T
from reteq.sweep import remote
from reteq.sweep.leaves import AXES, LEAF, knob_axes, trial_config
from reteq.sweep.nodes import leaf_dependencies

POLL_EVERY_S = 0.5  # Tune calls the searcher and callbacks many times a second; asking Ray less often is enough


def _root_failure(err: BaseException) -> tuple[str | None, str]:
    cause = getattr(err, "cause", None) or err
    key = getattr(cause, "key", None)
    msg = str(getattr(cause, "message", "") or cause).strip().splitlines()
    return key, (msg[-1] if msg else type(err).__name__)


class NodeWatch:
    def __init__(self, plan, refs: dict[str, Any], already_done: set[str], echo=print):
        self.plan, self.refs, self.echo = plan, refs, echo
        self.pending = {k: r for k, r in refs.items() if k not in already_done}
        self.published: dict[str, dict] = {k: {} for k in already_done}
        self.failed: dict[str, tuple[str, str]] = {}  # key -> (the node that failed first on its path, error)
        self.total = len(self.pending)
        self.t0 = self._last = time.time()

    def poll(self, force: bool = False) -> None:
        if not self.pending or (not force and time.time() - self._last < POLL_EVERY_S):
            return
        self._last = time.time()
        done = remote.settled(self.pending)
        for key in sorted(done, key=lambda k: len(self.plan.nodes[k].prefix)):  # parents before children
            del self.pending[key]
            value, error = done[key]
            node = self.plan.nodes[key]
            what = f"{node.model} {T.order_tag(node.prefix)} (seed {node.seed})"
            if error is None:
                self.published[key] = value
                n = len(self.published) - (len(self.refs) - self.total)
                self.echo(f"[node {n}/{self.total}] {what}: published at +{time.time() - self.t0:.0f}s")
            else:  # the node itself failed, or the node it continues from did
                parent = node.parent
                if parent in self.failed:
                    self.failed[key] = self.failed[parent]
                    self.echo(f"[node] {what}: not trained, node {self.failed[key][0][:8]} failed")
                else:
                    k, msg = _root_failure(error)
                    self.failed[key] = (k or key, msg)
                    self.echo(f"[node] {what}: FAILED: {msg}")

    def state(self, key: str) -> str:
        return "published" if key in self.published else "failed" if key in self.failed else "pending"


class DagSearcher(Searcher):
    def __init__(self, leaves: list, watch: NodeWatch):
        super().__init__()
        self.waiting = list(leaves)
        self.watch = watch
        self.skipped: dict[str, tuple[Any, str]] = {}  # leaf key -> (leaf, failed node key)
        self.started: dict[str, float] = {}  # leaf key -> when it was handed to Tune
        self.knobs = knob_axes(leaves)  # the methods' knob axes, named in every config handed out

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the param_space only names the axes (so Tune shows them); the leaves come from here

    def suggest(self, trial_id: str) -> dict | None:
        self.watch.poll()
        for leaf in list(self.waiting):
            states = [self.watch.state(k) for k in leaf_dependencies(leaf)]
            if "failed" in states:
                self.waiting.remove(leaf)
                bad = next(k for k in leaf_dependencies(leaf) if self.watch.state(k) == "failed")
                root, msg = self.watch.failed[bad]
                self.skipped[leaf.key] = (leaf, root)
                self.watch.echo(f"[leaf] {_leaf_text(leaf)}: skipped, node {root[:8]} failed ({msg})")
            elif all(s == "published" for s in states):
                self.waiting.remove(leaf)
                self.started[leaf.key] = time.time()
                return trial_config(leaf, self.knobs)
        return Searcher.FINISHED if not self.waiting else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:  # a rerun resumes from MLflow (finished keys), not from Tune
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


def _knob_text(params: dict) -> str:
    return "".join(f" {k}={v:g}" for k, v in sorted(params.items()))


def _leaf_text(leaf) -> str:
    return (f"{leaf.model} {T.order_tag(leaf.order)} {leaf.algorithm} lr={leaf.lr:g}{_knob_text(leaf.params)} "
            f"seed={leaf.seed}")


def _config_text(c: dict) -> str:
    knobs = {k: v for k, v in c.items() if k not in (*AXES, LEAF) and v is not None and isinstance(v, (int, float))}
    return f"{c['model']} {c['order']} {c['algorithm']} lr={c['lr']:g}{_knob_text(knobs)} seed={c['seed']}"


class ConsoleLines(Callback):
    """One line per finished or failed leaf; the node refs are polled once per Tune loop step."""

    def __init__(self, watch: NodeWatch, total: int):
        self.watch, self.total, self.done = watch, total, 0

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self.watch.poll()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        r = trial.last_result or {}
        forget = f"forget {r['forget']:.3f} at step {r.get('step', '?')}" if "forget" in r else "no metrics"
        self.watch.echo(f"[leaf {self.done}/{self.total}] {_config_text(trial.config)}: {forget}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        self.watch.echo(f"[leaf {self.done}/{self.total}] {_config_text(trial.config)}: FAILED "
                        f"(Ray Tune retried it {trial.num_failures - 1} times; error in {trial.error_file})")
