"""The MLflow UI as the comparison surface, in a real browser: `reteq ui` (a real MLflow server) on a finished tiny
sweep, driven by Debian's headless Chromium through Selenium and /usr/bin/chromedriver.

It opens the link `reteq ui` prints and asserts what a user sees: the "Training runs" page (not the GenAI
overview), the unlearning runs listed, and one line per unlearning run in the `forget/label_logp` chart. The
screenshots it takes are docs/mlflow_ui.md's: `RETEQ_DOCS_IMG=docs/img pytest tests/test_mlflow_ui.py` writes them
there, from a sweep with p = 1..4 (the plain test runs p = 3, 4 only, to stay short).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from helpers import reteq_cache  # noqa: F401

from reteq import tracking as T
from reteq.commands.sweep import run_sweep
from reteq.config import parse_config
from reteq.sweep import mlflow_ui
from tests.sweep_configs import tiny_sweep

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("reteq_cache")]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOCS_IMG = os.environ.get("RETEQ_DOCS_IMG")  # a folder: the screenshots are written there too (docs/img)
SERVER_START_S = 300  # MLflow's server imports a lot: ~5 s on idle cores, over a minute on loaded ones
PAGE_S = 120  # the React app's first render, on 2 shared cores
TABS = ("runs", "overview", "traces", "models", "evaluation-runs")  # the experiment page's tabs MLflow may land on


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements.lock)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver; .ci/run does)"
    return None


if _browser_missing() and not os.environ.get("CI"):  # CI installs both: there a missing browser fails below
    pytest.skip(_browser_missing(), allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_sweep(ray_cluster, tmp_path_factory):
    """A tiny sweep, run to the end: one cell (GA, lr 1e-3, seed 0) over the orders with U at p = 3, 4 (docs: 1..4)."""
    work = tmp_path_factory.mktemp("ui-sweep") / "work"
    positions = (1, 2, 3, 4) if DOCS_IMG else (3, 4)
    cfg = parse_config(tiny_sweep(work, name="ui-sweep", positions=positions, algorithms=("ga",), lrs=(1e-3,),
                                  workers=1, deepspeed="zero0_fp32.json", unlearn_steps=3))
    assert run_sweep(cfg, report=False).code == 0
    return cfg, work


@pytest.fixture(scope="module")
def reteq_ui(finished_sweep):
    """`reteq ui --work-dir WORK` as a user starts it; yields (base URL, the lines it printed)."""
    cfg, work = finished_sweep
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reteq", "ui", "--work-dir", str(work), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    base, lines = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, "reteq ui exited:\n" + "".join(lines) + proc.stdout.read()
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"the MLflow server did not answer on {base} within {SERVER_START_S} s")
        os.set_blocking(proc.stdout.fileno(), False)
        lines = proc.stdout.readlines()  # printed before the server started
        yield base, lines
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # reteq ui, the mlflow CLI and its server workers: our own group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.fail(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,950", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(PAGE_S)
    yield driver
    driver.quit()


def _wait(driver, what: str, fn, timeout: float = PAGE_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: fn(d))
    except Exception as err:  # TimeoutException: say what was awaited, and where the browser is
        raise AssertionError(f"waited {timeout:.0f} s for {what}; the page is {driver.current_url}:\n"
                             f"{driver.find_element('tag name', 'body').text[:1500]}") from err


def _close_assistant(driver) -> None:
    """MLflow 3.17 opens its "MLflow Assistant" panel on a first visit; close it so the charts get the width."""
    driver.execute_script("document.querySelectorAll('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
                          ".forEach(b => b.click())")


# the traces of the chart card titled `metric`: one entry per plotted series (Plotly's own data on the element)
_TRACES_JS = """
const title = [...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"] h4')]
  .find(h => h.textContent.trim() === arguments[0]);
if (!title) return null;
const plot = title.closest('[data-testid="experiment-view-compare-runs-card"]').querySelector('.js-plotly-plot');
if (!plot || !plot.data) return null;
return plot.data.map(t => ({name: String(t.name || ''), uuid: String(t.uuid || ''), mode: String(t.mode || ''),
                             points: (t.x || []).length}));
"""


def _line_traces(driver, metric: str):
    traces = driver.execute_script(_TRACES_JS, metric)
    return None if traces is None else [t for t in traces if "lines" in t["mode"] and t["points"] >= 2]


def _shot(driver, tmp_path: Path, name: str) -> Path:
    time.sleep(2)  # let the charts' transitions end
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if DOCS_IMG:
        Path(DOCS_IMG).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(DOCS_IMG) / path.name)
    return path


def _unlearn_runs(uri: str, experiment: str):
    from reteq.mlflow_store import search_runs, tracking_client

    c = tracking_client(uri)
    exp = c.get_experiment_by_name(experiment)
    return exp, search_runs(c, exp.experiment_id, mlflow_ui.UNLEARN_FILTER)


def test_reteq_ui_opens_on_the_runs_page_with_one_curve_per_unlearning_run(finished_sweep, reteq_ui, browser,
                                                                        tmp_path):
    cfg, work = finished_sweep
    base, printed = reteq_ui
    exp, runs = _unlearn_runs(T.default_tracking_uri(work), cfg.name)
    ray_tree = ray.get(ray.remote(lambda: __import__("reteq").__file__).remote())
    assert Path(ray_tree).is_relative_to(Path(T.__file__).parent), ray_tree  # Ray's workers ran this tree
    names = sorted(r.info.run_name for r in runs)
    assert len(names) == len(cfg.orders.forget_positions), names
    links = [line.split(": ", 1)[1].strip() for line in printed if line.strip().startswith(f"{cfg.name}: ")]
    # what `reteq ui` prints for the sweep; an older reteq printed none, and the user opened the experiment
    url = links[0] if links else f"{base}/#/experiments/{exp.experiment_id}"

    problems = [] if all(n.startswith("p") for n in names) else [f"run names do not start with p: {names}"]
    browser.get(url)
    _wait(browser, "an experiment tab", lambda d: any(f"/{tab}" in d.current_url.split("?")[0] for tab in TABS)
          and d.find_elements("css selector", "[data-component-id*='experiment']"))
    _close_assistant(browser)
    tab = browser.current_url.split("#", 1)[-1].split("?")[0]
    if "/runs" not in tab:
        problems.append(f"the runs page did not open: {browser.current_url}")
    else:  # the runs table's column headers
        _wait(browser, "the runs table", lambda d: d.find_elements("css selector", "[data-testid^='sort-header-']"))
    try:
        _wait(browser, "the unlearning runs in the runs list", lambda d: all(
            n in d.find_element("tag name", "body").text for n in names), timeout=60)
    except AssertionError as err:
        problems.append(f"the runs list does not show the unlearning runs {names}: {str(err)[:600]}")
    try:
        traces = _wait(browser, f"the {T.M_FORGET_LABEL} chart with its lines",
                       lambda d: _line_traces(d, T.M_FORGET_LABEL) or False, timeout=60)
        drawn = sorted({t["name"] for t in traces})  # Plotly may draw a run as two traces (line, highlight)
        if drawn != names or {t["uuid"] for t in traces} != {r.info.run_id for r in runs}:
            problems.append(f"{T.M_FORGET_LABEL} draws {drawn}, not one line per unlearning run {names}")
    except AssertionError as err:
        problems.append(f"no {T.M_FORGET_LABEL} chart with lines: {str(err)[:600]}")
    _shot(browser, tmp_path, "mlflow_ui_curves")
    assert not problems, "\n".join(problems)

    # where theta_r's run is: the runs of kind retrain, by name (θ_r · <order without U> · s<seed> · <model>)
    browser.get(mlflow_ui.runs_url(exp.experiment_id, mlflow_ui.RETRAIN_FILTER, base, charts=False))
    _wait(browser, "theta_r's run", lambda d: "θ_r · inst>tofu>math" in d.find_element("tag name", "body").text)
    _close_assistant(browser)
    _shot(browser, tmp_path, "mlflow_ui_theta_r")

    # the same runs grouped by p (the saved view that sets MLflow's "Group by" to param p): one line per p. Last:
    # MLflow keeps a view's grouping in the browser's state for the experiment, so pages opened after it are grouped
    browser.get(mlflow_ui.view_url(exp.experiment_id, T.VIEW_BY_P, base))
    _wait(browser, "the grouped chart", lambda d: _line_traces(d, T.M_FORGET_LABEL) or False)
    _close_assistant(browser)
    groups = {t["uuid"] for t in _line_traces(browser, T.M_FORGET_LABEL)}  # MLflow names a group's line param.p.<p>
    assert groups == {f"param.p.{p}" for p in cfg.orders.forget_positions}, groups
    _shot(browser, tmp_path, "mlflow_ui_group_by_p")
