"""The MLflow UI in a real headless Chromium shows a raypod job's run and its loss chart.

A real ``mlflow server`` (the fixture class of ``test_mlflow_server.py``) receives a job's
logging through :class:`~raypod.tracking.MLflowCallback` (steps with a failure and
replayed steps, driven directly so the test needs no Ray). Chromium (Debian's
``chromium`` package) opens the experiment's runs page, finds the run by name, opens
its model-metrics tab and waits for the ``loss`` chart. The screenshots are saved under
the test's tmp path and copied to ``test-artifacts/`` at the repo root (or
``$RAYPOD_TEST_ARTIFACTS``). Driven with Playwright when it is installed, else with
``chromium --headless --dump-dom/--screenshot`` (``RAYPOD_BROWSER_DRIVER=cli`` forces
that); skipped when Chromium is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLFLOW_CLUSTER_JOB, MLFLOW_REGISTERED_MODEL, MlflowServer
from support import REPO, TINY

from raypod.callbacks import FailureEvent, JobInfo, StepReport
from raypod.config import load_config

JOB = "browser-job"
EXPERIMENT = "raypod-ui"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                       "(apt-get install -y chromium); the MLflow UI test needs a real browser"),
]


def _artifacts_dir() -> Path:
    out = Path(os.environ.get("RAYPOD_TEST_ARTIFACTS", REPO / "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A server with one raypod job's run: 40 steps, a kill at step 25, steps 21-24 replayed."""
    from mlflow.tracking import MlflowClient

    from raypod.tracking import MLflowCallback

    root = tmp_path_factory.mktemp("mlflow-ui")
    server = MlflowServer(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        server.start()
        try:
            cfg = load_config(TINY, [f"checkpoint.storage={root}", f"name={JOB}",
                                     f"mlflow.tracking_uri={server.uri}",
                                     f"mlflow.experiment={EXPERIMENT}", "train.max_steps=40"])
            start = time.time() - 60
            cb = MLflowCallback(flush_interval_s=0.2, system_metrics=False)
            cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=start))

            def step(s: int, t: float) -> None:
                cb.after_step(StepReport(step=s, time_s=t, metrics={
                    "loss": 5.5 * 0.96 ** s + 0.3, "lr": 3e-3, "samples_per_s": 120.0 + s % 3,
                    "world_size": 2.0, "goodput": 0.95}))

            for s in range(1, 25):
                step(s, s * 1.0)
            ev = FailureEvent(kind="kill", step=25, rank=1, detected_s=25.2, message="rank 1 died")
            cb.after_failure(ev)
            for s in range(21, 41):
                step(s, s * 1.0 + 8)
                if s == 21:
                    ev.resumed_s, ev.lost_steps, ev.world_size_after = 29.0, 4, 2
                    ev.restored_from = "checkpoint step 20"
                    cb.after_recovery(ev)
            summary = {"status": "succeeded", "final_step": 40}
            path = Path(cfg.job_dir) / "summary.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary))
            cb.after_job(summary, str(path))
            run_id = cb.run_id
            exp_id = MlflowClient(server.uri).get_experiment_by_name(EXPERIMENT).experiment_id
            yield server, exp_id, run_id
        finally:
            server.stop()


def test_mlflow_ui_shows_the_run_and_its_loss_chart(logged_run, tmp_path):
    server, exp_id, run_id = logged_run
    runs_url = f"{server.uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        use_cli = True
    else:
        use_cli = os.environ.get("RAYPOD_BROWSER_DRIVER") == "cli"
    if use_cli:
        shots = _with_chromium_cli(server, exp_id, run_id, tmp_path)
    else:
        shots = _with_playwright(runs_url, run_id, tmp_path)
    out = _artifacts_dir()
    for shot in shots:
        assert shot.stat().st_size > 10_000, f"{shot} looks empty"
        shutil.copy2(shot, out / shot.name)


def _with_playwright(runs_url: str, run_id: str, tmp_path: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    runs_png, chart_png = tmp_path / "mlflow-ui-runs.png", tmp_path / "mlflow-ui-loss-chart.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(runs_url, wait_until="domcontentloaded")
            # The experiment's runs table lists the job by name: open it from there.
            link = page.get_by_role("link", name=JOB, exact=True).first
            expect(link).to_be_visible(timeout=30_000)  # a cold UI bundle on a loaded host: >5 s
            page.screenshot(path=str(runs_png))
            link.click()
            page.wait_for_url(f"**/runs/{run_id}**")
            page.get_by_role("tab", name="Model metrics").click()
            # The loss chart: its title, its legend entry for this run, a drawn plot.
            expect(page.get_by_text("loss", exact=True).first).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"{JOB} (loss)")).to_be_visible(timeout=30_000)
            expect(page.locator("svg.main-svg, .js-plotly-plot").first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1000)  # let the plot finish drawing
            page.screenshot(path=str(chart_png))
        finally:
            browser.close()
    return [runs_png, chart_png]


def _with_chromium_cli(server: MlflowServer, exp_id: str, run_id: str,
                       tmp_path: Path) -> list[Path]:
    url = (f"{server.uri}/#/experiments/{exp_id}/runs/{run_id}/model-metrics"
           "?workflowType=machine_learning")
    base = [CHROMIUM, "--headless", *CHROME_ARGS, f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,900"]
    for budget in (20_000, 60_000, 120_000):  # a slow machine renders the charts late
        budget_arg = f"--virtual-time-budget={budget}"
        dom = subprocess.run([*base, budget_arg, "--dump-dom", url], capture_output=True,
                             text=True, timeout=300).stdout
        if f"{JOB} (loss)" in dom:
            break
    assert JOB in dom, "the run's name is not in the page"
    assert f"{JOB} (loss)" in dom and 'title="loss"' in dom, "no loss chart in the page"
    chart_png = tmp_path / "mlflow-ui-loss-chart.png"
    subprocess.run([*base, budget_arg, f"--screenshot={chart_png}", url], capture_output=True,
                   timeout=300, check=True)
    return [chart_png]


@pytest.mark.timeout(600)  # the 2-node Cluster job runs in the fixture
def test_mlflow_ui_shows_the_logged_model_and_every_nodes_system_metrics(mlflow_cluster_job, tmp_path):
    """The link raypod gives (summary ``mlflow_url``) opens the run on model-training pages: its
    logged model, registered, and the system metrics of both worker nodes of the Cluster job."""
    url = mlflow_cluster_job["mlflow_url"]
    labels = [n[:8] for n in mlflow_cluster_job["worker_nodes"]]
    run_id = mlflow_cluster_job["mlflow_run_id"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        use_cli = True
    else:
        use_cli = os.environ.get("RAYPOD_BROWSER_DRIVER") == "cli"
    overview_png, system_png = tmp_path / "mlflow-ui-model.png", tmp_path / "mlflow-ui-nodes.png"
    if use_cli:
        base = [CHROMIUM, "--headless", *CHROME_ARGS, f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1400,1000", "--virtual-time-budget=60000"]
        system_url = url.replace(f"/runs/{run_id}?", f"/runs/{run_id}/system-metrics?")
        for page_url, png in ((url, overview_png), (system_url, system_png)):
            dom = subprocess.run([*base, "--dump-dom", page_url], capture_output=True, text=True,
                                 timeout=300).stdout
            if png is overview_png:
                assert "Logged models" in dom and MLFLOW_REGISTERED_MODEL in dom, "no logged model"
            else:
                assert all(f"system/{label}" in dom for label in labels), "not every node's metrics"
            subprocess.run([*base, f"--screenshot={png}", page_url], capture_output=True, timeout=300,
                           check=True)
    else:
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(url, wait_until="domcontentloaded")
                # Model-training pages (not GenAI): the run's tabs, its logged model, registered.
                expect(page.get_by_role("tab", name="Model metrics")).to_be_visible(timeout=30_000)
                expect(page.get_by_text("Logged models (1)")).to_be_visible(timeout=30_000)
                expect(page.get_by_role("link", name=MLFLOW_REGISTERED_MODEL).first).to_be_visible(timeout=30_000)
                page.screenshot(path=str(overview_png), full_page=True)
                page.get_by_role("tab", name="System metrics").click()
                for label in labels:  # a chart section per node, with its CPU chart
                    expect(page.get_by_text(f"system/{label}", exact=True)).to_be_visible(timeout=30_000)
                    expect(page.get_by_text(f"{MLFLOW_CLUSTER_JOB} (system/{label}/cpu_utilization_percentage)")
                           ).to_be_visible(timeout=30_000)
                page.wait_for_timeout(1000)  # let the plots finish drawing
                page.screenshot(path=str(system_png))
            finally:
                browser.close()
    out = _artifacts_dir()
    for shot in (overview_png, system_png):
        assert shot.stat().st_size > 10_000, f"{shot} looks empty"
        shutil.copy2(shot, out / shot.name)
