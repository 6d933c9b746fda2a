"""`reteq data prepare CONFIG [--out DIR]`: every stage (and the math eval set) to local Parquet + manifest, then
each stage's length against its max_length per model (rows truncated, longest row), where the tokenizer loads."""

from __future__ import annotations

import json
from pathlib import Path

from reteq.config import SweepConfig, load_config
from reteq.data.prepare import prepare, read_prepared
from reteq.errors import BadInput, DataError, ModelError, PrepareError
from reteq.hub_pins import check_pinned
from reteq.workdir import data_home, resolve_work_dir


def prepare_command(config: str, out_dir: str | None = None, allow_unpinned: bool = False) -> int:
    """0 on success; a bad config, unavailable data, an unwritable folder or rows truncated above a stage's
    max_truncated_frac raise BadInput (`file: field: reason`).

    The default out_dir is $RETEQ_DATA_DIR, else `<work_dir>/data`.
    """
    cfg = load_config(config)
    check_pinned(cfg, config, allow_unpinned)  # a hub model or dataset not pinned to a commit: refused first
    target = Path(out_dir) if out_dir else data_home() or resolve_work_dir(cfg.work_dir) / "data"
    try:
        manifest = prepare(cfg, target, report=lambda line: print(line, flush=True))
    except PrepareError as e:
        raise PrepareError(f"{config}: {e.field}", e.reason) from None
    except OSError as e:
        raise BadInput(f"{config}: data prepare: cannot write {target}: {e}") from None
    print(f"manifest: {manifest}")
    try:
        report_lengths(cfg, manifest)
    except DataError as e:
        raise DataError(f"{config}: {e}") from None
    return 0


def report_lengths(cfg: SweepConfig, manifest: Path) -> None:
    """Print, per stage, model and limit, how many prepared rows exceed max_length and the longest row (the
    preflight's check, on the files just written). A tokenizer that cannot load here (no network, gated) leaves
    the lengths unknown, said in one line: the sweep's preflight reports them where it loads."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline import context, preflight

    stages = json.loads(manifest.read_text())["stages"]
    data = context.DataCache.holding(cfg, {name: read_prepared(manifest.parent / entry["file"])
                                           for name, entry in stages.items()})
    try:
        preflight.check_rows_fit(cfg, data, report=lambda line: print(f"length: {line}", flush=True))
    except ModelError as e:
        print(f"length: unknown ({e}); the sweep's preflight reports it", flush=True)
