"""Ray Jobs entry point: `python rayjobs/sweep.py CONFIG [OPTIONS]` runs `reteq sweep CONFIG [OPTIONS]`.

For clusters or images where the `reteq` console script is not on PATH, e.g.

    ray job submit --working-dir . --runtime-env rayjobs/runtime_env.yaml -- python rayjobs/sweep.py CONFIG
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts rayjobs/ (not the repository root) on sys.path; make the checkout importable
# even where reteq is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reteq.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
