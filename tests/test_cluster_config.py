"""Static checks of the deployment files: cluster.yaml (Ray cluster launcher, AWS) and rayjobs/.

Nothing here touches AWS or starts Ray: the files are parsed and checked against what docs/cluster.md
promises and, where the installed Ray ships them, against Ray's own schema and runtime-env validation.
"""

from __future__ import annotations

import re
import runpy
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
RUNTIME_ENV_YAML = ROOT / "rayjobs" / "runtime_env.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    data = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(data, dict), "cluster.yaml: top level must be a mapping"
    return data


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    data = yaml.safe_load(RUNTIME_ENV_YAML.read_text())
    assert isinstance(data, dict), "rayjobs/runtime_env.yaml: top level must be a mapping"
    return data


def _worker_types(cluster: dict) -> dict[str, dict]:
    head = cluster["head_node_type"]
    return {name: t for name, t in cluster["available_node_types"].items() if name != head}


def _node_env(cluster: dict) -> dict[str, str]:
    """The `export NAME=VALUE` lines setup_commands writes to ~/reteq.env (values as written, unexpanded)."""
    env: dict[str, str] = {}
    for cmd in cluster["setup_commands"]:
        for m in re.finditer(r"^export (\w+)=(\S+)", cmd, flags=re.MULTILINE):
            env[m.group(1)] = m.group(2)
    return env


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


# ---- cluster.yaml ---------------------------------------------------------------------------------------------
def test_cluster_provider_is_aws_with_required_fields(cluster):
    assert cluster["cluster_name"]
    provider = cluster["provider"]
    assert provider["type"] == "aws"
    assert provider["region"]
    assert provider["availability_zone"]
    assert isinstance(provider["cache_stopped_nodes"], bool)
    assert cluster["auth"]["ssh_user"]


def test_head_node_type_is_a_declared_cpu_node(cluster):
    types_ = cluster["available_node_types"]
    assert cluster["head_node_type"] in types_
    head = types_[cluster["head_node_type"]]
    assert head["node_config"]["InstanceType"]
    assert head.get("resources", {}).get("GPU", 0) == 0, "the head runs MLflow and the driver, not training"


def test_every_worker_type_is_a_gpu_type_that_scales_from_zero(cluster):
    workers = _worker_types(cluster)
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t["node_config"]["InstanceType"], name
        assert t.get("resources", {}).get("GPU", 0) > 0, f"{name}: resources must declare GPU > 0"
        assert t.get("min_workers") == 0, f"{name}: min_workers must be 0 (no idle GPU spend)"
        assert t.get("max_workers", 0) >= 1, f"{name}: max_workers must be >= 1"
    # one type with several GPUs for the DeepSpeed runs of the 8B-14B models
    assert max(t["resources"]["GPU"] for t in workers.values()) >= 8


def test_global_max_workers_covers_the_node_type_minimums(cluster):
    mins = sum(t.get("min_workers", 0) for t in cluster["available_node_types"].values())
    assert cluster["max_workers"] >= max(mins, 1)


def test_spot_worker_type_uses_instance_market_options(cluster):
    spot = [
        name
        for name, t in _worker_types(cluster).items()
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert spot, "expected an optional spot worker type"


def test_workers_can_reach_s3_through_their_own_limited_role(cluster):
    for name, t in _worker_types(cluster).items():
        profile = t["node_config"].get("IamInstanceProfile", {}).get("Name")
        assert profile, f"{name}: workers write Ray storage to S3"
        assert profile != "ray-autoscaler-v1", f"{name}: the head's role (EC2 + S3 full access) is not for workers"
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    assert head.get("IamInstanceProfile", {}).get("Name") != "reteq-worker"


def test_worker_role_in_the_docs_is_limited_to_the_s3_prefix():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    policy = re.search(r"reteq-worker-s3.*?--policy-document '(\{.*?\})'", docs, re.S)
    assert policy, "docs/cluster.md must create the reteq-worker role's S3 policy"
    import json

    statements = json.loads(policy.group(1))["Statement"]
    resources = [r for s in statements for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])]
    assert all(r.startswith("arn:aws:s3:::BUCKET") for r in resources), resources
    assert "*" not in {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert all(r in ("arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/reteq/*") for r in resources), resources


def test_token_auth_is_set_up_before_ray_starts(cluster):
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts), starts
    assert _node_env(cluster)["RAY_AUTH_MODE"] == "token"  # every ray CLI on the nodes uses it too
    assert "test -s ~/.ray/auth_token" in cluster["setup_commands"][0]  # no token: `ray up` stops, never opens


def test_nodes_read_prepared_data_fetched_once_from_s3(cluster):
    env = _node_env(cluster)
    assert env["RETEQ_DATA_DIR"].endswith("$HOME/reteq-data")  # written as \$HOME: expanded on the node
    assert any("aws s3 sync" in c and "$RETEQ_S3/data $RETEQ_DATA_DIR" in c for c in cluster["setup_commands"])


def test_torch_is_installed_only_where_missing(cluster):
    [cmd] = [c for c in cluster["setup_commands"] if re.search(r"pip install\b.*\btorch==", c)]
    assert "import torch" in cmd and "||" in cmd


def test_setup_installs_torch_before_reteq(cluster):
    cmds = cluster["setup_commands"]
    torch_at = [i for i, c in enumerate(cmds) if re.search(r"pip install\b.*\btorch==", c)]
    reteq_at = [i for i, c in enumerate(cmds) if re.search(r"pip install\b.*\s-e\s+\S*reteq\b", c)]
    assert torch_at, "no `pip install torch==...` in setup_commands"
    assert reteq_at, "no editable install of reteq in setup_commands"
    assert torch_at[0] < reteq_at[0], "torch must be installed before reteq"
    # the cluster runs the same Ray as the client that submits to it: the lock's, installed with its hashes
    assert any("--require-hashes -r ~/reteq/requirements.lock" in c for c in cmds)
    assert re.search(r"^ray\[default, ?train, ?tune\]==2\.60\.0 ", (ROOT / "requirements.lock").read_text(), re.M)


def test_nodes_point_mlflow_at_the_head_and_disable_usage_stats(cluster):
    env = _node_env(cluster)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert re.fullmatch(r"http://\$\{?HEAD_IP\}?:5000", env["MLFLOW_TRACKING_URI"])
    assert env["RETEQ_S3"].startswith("s3://")
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("--disable-usage-stats" in c for c in starts if "ray start" in c)


def test_head_runs_mlflow_server_with_postgresql_store_and_s3_artifacts(cluster):
    env = _node_env(cluster)
    text = "\n".join(cluster["head_setup_commands"])
    server = re.search(r"mlflow server (.*)", text)
    assert server, "head_setup_commands must start `mlflow server`"
    args = server.group(1)
    assert re.search(r"--host \$RETEQ_HEAD_IP\b", args) and re.search(r"--port 5000\b", args)  # private only
    backend = _expand(re.search(r"--backend-store-uri (\S+)", args).group(1), env)
    artifacts = _expand(re.search(r"--artifacts-destination (\S+)", args).group(1), env)
    assert backend.startswith("postgresql+psycopg://"), backend  # SQLAlchemy's psycopg 3 driver, named
    assert artifacts.startswith("s3://"), artifacts
    assert "postgresql" in text, "PostgreSQL must be installed on the head"
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^psycopg\[binary\]==", lock, re.M), "the driver comes with requirements.lock on every node"


def test_the_tracking_server_is_authenticated_and_its_secrets_live_in_files_only(cluster):
    """MLflow's basic-auth app; its secrets in 0600 env files made on the head (tests/test_secrets.py runs that
    step and the unit, and shows a client without credentials refused), none in this file or on a command line."""
    from reteq.redact import redact

    text = (ROOT / "cluster.yaml").read_text()
    assert redact(text) == text, "a URI with a password in cluster.yaml"
    assert "PASSWORD 'mlflow'" not in text and "mlflow:mlflow@" not in text
    head = "\n".join(cluster["head_setup_commands"])
    [exec_start] = [x for x in head.splitlines() if x.strip().startswith("ExecStart=")]
    assert "--app-name basic-auth" in exec_start and "PASSWORD" not in exec_start.upper()
    assert "EnvironmentFile=$HOME/.reteq/mlflow-server.env" in head
    assert "umask 077" in head and "chmod 600 ~/.reteq/mlflow-server.env ~/.reteq/mlflow-client.env" in head
    assert "default_permission = NO_PERMISSIONS" in head
    assert "ALTER ROLE mlflow PASSWORD '$PGPASSWORD'" in head  # through psql's stdin (a heredoc), not argv
    env = "\n".join(cluster["setup_commands"])
    assert "mlflow-client.env" in env and "-r \\$HOME/.reteq/mlflow-client.env" in env  # sourced where it exists
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^flask-wtf==", lock, re.M | re.I), "mlflow[auth]'s dependency comes with requirements.lock"


def test_file_mounts_skip_local_venv_and_runs(cluster):
    assert "." in cluster["file_mounts"].values()
    excluded = set(cluster["rsync_exclude"])
    assert {".venv", "runs"} <= excluded


def test_cluster_yaml_matches_rays_schema(cluster):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip("the installed Ray ships no ray-schema.json")
    jsonschema = pytest.importorskip("jsonschema")
    import json

    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_rays_own_config_validation(cluster):
    """What `ray up` does before touching AWS: merge with the provider defaults, then validate."""
    import copy

    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API; moved in another Ray version
        pytest.skip("ray.autoscaler._private.util is not available in this Ray")
    pytest.importorskip("jsonschema")
    validate_config(prepare_config(copy.deepcopy(cluster)))


# ---- rayjobs/ -------------------------------------------------------------------------------------------------
def test_runtime_env_is_valid_for_ray(runtime_env):
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # raises on unknown or malformed fields
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert runtime_env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    # the node's environment already has reteq's dependencies; these would reinstall torch on every job
    assert not {"pip", "uv", "conda", "container", "image_uri"} & set(runtime_env)
    assert "working_dir" not in runtime_env, "working_dir comes from `ray job submit --working-dir`"


def test_runtime_env_excludes_venv_runs_and_git(runtime_env):
    excludes = runtime_env["excludes"]
    assert any(p.strip("/") == ".venv" for p in excludes)
    assert any(p.strip("/") == "runs" for p in excludes)
    assert any(p.strip("/") == ".git" for p in excludes)
    try:  # match the way Ray does when it zips the working dir
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:
        return
    spec = PathSpec.from_lines("gitwildmatch", excludes)
    for path in [".venv", ".venv/bin/python", "runs/default/mlflow.db", ".git/HEAD", "reteq/__pycache__/a.pyc"]:
        assert spec.match_file(path), f"{path} would be uploaded"
    for path in ["reteq/cli.py", "configs/demo.yaml", "rayjobs/runtime_env.yaml", "pyproject.toml"]:
        assert not spec.match_file(path), f"{path} would be left out of the job"


def test_job_submission_parses_runtime_env_with_working_dir():
    """What `ray job submit --working-dir . --runtime-env rayjobs/runtime_env.yaml` builds on the client."""
    try:
        from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    except ImportError:
        pytest.skip("ray.dashboard.modules.dashboard_sdk is not available in this Ray")
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_YAML), working_dir=str(ROOT))
    assert env["working_dir"] == str(ROOT)
    RuntimeEnv(**env)


def test_working_dir_upload_leaves_out_venv_and_runs_and_fits_rays_limit(runtime_env, tmp_path):
    """Zip the checkout as Ray does for --working-dir (excludes only, .gitignore ignored) and inspect it."""
    import zipfile

    try:
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _zip_files
    except ImportError:  # private API; moved in another Ray version
        pytest.skip("ray._private.runtime_env.packaging is not available in this Ray")
    out = tmp_path / "working_dir.zip"
    _zip_files(str(ROOT), runtime_env["excludes"], str(out), include_gitignore=False)
    names = zipfile.ZipFile(out).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert not top & {".venv", "runs", ".git"}, sorted(top & {".venv", "runs", ".git"})
    assert not any("__pycache__" in n for n in names)
    assert {"pyproject.toml", "rayjobs/runtime_env.yaml", "cluster.yaml"} <= set(names)
    assert out.stat().st_size < GCS_STORAGE_MAX_SIZE


@pytest.mark.parametrize("script, verb", [("sweep.py", "sweep"), ("report.py", "report")])
def test_rayjobs_entry_points_forward_to_the_cli(monkeypatch, script, verb):
    calls: list[list[str]] = []
    fake_cli = types.ModuleType("reteq.cli")
    fake_cli.main = lambda argv=None: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "reteq.cli", fake_cli)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", [script, "configs/demo.yaml", "--flag"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "rayjobs" / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert calls == [[verb, "configs/demo.yaml", "--flag"]]
