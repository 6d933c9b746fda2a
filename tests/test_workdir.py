"""A relative work_dir never lands inside a Ray job's per-job package copy (reteq.workdir's precedence)."""

from __future__ import annotations

from reteq.workdir import resolve_work_dir


def test_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("RETEQ_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plain = tmp_path / "checkout"
    job = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    plain.mkdir()
    job.mkdir(parents=True)

    monkeypatch.chdir(plain)
    assert resolve_work_dir("runs/demo") == plain / "runs/demo"  # 4. an ordinary relative path
    assert resolve_work_dir(tmp_path / "abs") == tmp_path / "abs"  # 1. absolute: as is

    monkeypatch.chdir(job)
    assert resolve_work_dir("runs/demo") == tmp_path / "home/reteq-runs/runs/demo"  # 3. inside a job's package
    assert resolve_work_dir(tmp_path / "abs") == tmp_path / "abs"

    monkeypatch.setenv("RETEQ_HOME", str(tmp_path / "reteq-home"))  # 2. RETEQ_HOME, in a job or not
    assert resolve_work_dir("runs/demo") == tmp_path / "reteq-home/runs/demo"
    monkeypatch.chdir(plain)
    assert resolve_work_dir("runs/demo") == tmp_path / "reteq-home/runs/demo"
    assert resolve_work_dir("~/x") == tmp_path / "home/x"
