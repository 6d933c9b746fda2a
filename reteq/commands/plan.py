"""`reteq validate CONFIG` and `reteq plan CONFIG [--json]`: check a sweep, show what it would run and cost."""

from __future__ import annotations

import json

from reteq.config import MAX_LEAVES, SweepConfig, load_config
from reteq.data.hub import converter_for
from reteq.errors import HubDataError
from reteq.estimate import format_plan, plan_report
from reteq.hub_pins import check_pinned, hub_sources


def fits_cluster(cfg: SweepConfig, config: str, cluster: str | None) -> None:
    """With `--cluster FILE`: every resource request of the sweep fits a node type of FILE (one line, exit 2, when
    a trial could never be placed: on an autoscaling cluster it would wait forever)."""
    if cluster:
        from reteq.sweep.cluster_fit import check_cluster_fit  # Ray and torch: only when asked

        check_cluster_fit(cfg, config, cluster)


def validate_command(config: str, cluster: str | None = None, max_leaves: int = MAX_LEAVES,
                     overrides: tuple[str, ...] = (), allow_unpinned: bool = False) -> int:
    """The config (one line per problem), that its trials fit the named cluster file's node types, and, offline,
    that every hub source has a converter and is pinned to a commit; a grid over `max_leaves` unlearning runs is
    refused."""
    cfg = load_config(config, max_leaves=max_leaves, overrides=overrides)
    fits_cluster(cfg, config, cluster)
    for field, source in hub_sources(cfg):
        try:
            converter_for(source)
        except HubDataError as e:
            raise HubDataError(f"{config}: {field}: {e}") from None
    check_pinned(cfg, config, allow_unpinned)
    print(f"{config}: ok")
    return 0


def plan_command(config: str, as_json: bool, cluster: str | None = None, max_leaves: int = MAX_LEAVES,
                 overrides: tuple[str, ...] = (), allow_unpinned: bool = False) -> int:
    cfg = load_config(config, max_leaves=max_leaves, overrides=overrides)
    fits_cluster(cfg, config, cluster)
    check_pinned(cfg, config, allow_unpinned)
    report = plan_report(cfg)
    print(json.dumps(report, indent=2) if as_json else format_plan(cfg, report))
    return 0
