"""Where a sweep's work dir (MLflow store, checkpoints, Ray results, prepared data, report) lives.

`ray job submit --working-dir .` runs the driver inside a per-job copy of the code
(.../runtime_resources/working_dir_files/_ray_pkg_<hash>), so a relative work_dir would land there: a new store
per code change, invisible to `reteq ui`, and no resume. Precedence, first match wins:
  1. an absolute work_dir (the config's `work_dir`, or `--work-dir`) is used as is;
  2. a relative one is resolved under $RETEQ_HOME when that is set (jobs or not);
  3. inside a Ray job's package copy, under ~/reteq-runs (the same on every submission);
  4. otherwise against the current directory, as any relative path.
"""

from __future__ import annotations

from pathlib import Path

from reteq import environment

RAY_JOB_PACKAGE_MARK = "_ray_pkg_"  # Ray's per-job working_dir copies are named _ray_pkg_<hash>
JOB_HOME_DEFAULT = "~/reteq-runs"


def in_ray_job_package(cwd: Path | None = None) -> bool:
    return RAY_JOB_PACKAGE_MARK in str(cwd or Path.cwd())


def cache_root() -> Path:
    """$RETEQ_CACHE (default ~/.cache/reteq): what reteq builds once per machine (the tiny model, an empty
    MLflow schema)."""
    return environment.cache_root()


def data_home() -> Path | None:
    """$RETEQ_DATA_DIR: prepared data shared by every sweep on this machine (a cluster syncs it from S3)."""
    d = environment.get(environment.DATA_DIR)
    return Path(d).expanduser() if d else None


def resolve_work_dir(work_dir: str | Path) -> Path:
    """The absolute work dir for `work_dir`, by the precedence above."""
    path = Path(work_dir).expanduser()
    if path.is_absolute():
        return path
    home = environment.get(environment.HOME)
    if home:
        return (Path(home).expanduser() / path).resolve()
    if in_ray_job_package():
        return (Path(JOB_HOME_DEFAULT).expanduser() / path).resolve()
    return path.resolve()
