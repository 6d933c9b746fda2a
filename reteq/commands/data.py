"""`reteq data prepare CONFIG [--out DIR]`: every stage (and the math eval set) to local Parquet + manifest."""

from __future__ import annotations

from pathlib import Path

from reteq.config import load_config
from reteq.data.prepare import prepare
from reteq.errors import BadInput, PrepareError
from reteq.workdir import data_home, resolve_work_dir


def prepare_command(config: str, out_dir: str | None = None) -> int:
    """0 on success; a bad config, unavailable data or an unwritable folder raise BadInput (`file: field: reason`).

    The default out_dir is $RETEQ_DATA_DIR, else `<work_dir>/data`.
    """
    cfg = load_config(config)
    target = Path(out_dir) if out_dir else data_home() or resolve_work_dir(cfg.work_dir) / "data"
    try:
        manifest = prepare(cfg, target, report=lambda line: print(line, flush=True))
    except PrepareError as e:
        raise PrepareError(f"{config}: {e.field}", e.reason) from None
    except OSError as e:
        raise BadInput(f"{config}: data prepare: cannot write {target}: {e}") from None
    print(f"manifest: {manifest}")
    return 0
