"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright): a QA user logs
in, filters the jobs, opens one and sees its views, looks at the trend plots and downloads the CSV.
No request may leave the dashboard's own address. Screenshots are kept as test artefacts, in
$DICOM_NODE_TEST_ARTEFACTS when set."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from qa_fixtures import PASSWORDS, Jobs, dashboard_config, fill_joblog

from dicom_node.joblog import JobLog
from dicom_node.qa.web import DashboardServer, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ALL_IMAGES_LOADED = "() => Array.from(document.images).every(image => image.complete)"
LOADED_WIDTHS = "images => images.map(image => image.naturalWidth)"
FILTERED = re.compile(
    r".*/jobs\?since=2026-11-21&until=&station=MG2&detector=&profile=&status=&flagged=yes&per_page=50$"
)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's chromium is not installed ({CHROMIUM})")


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DICOM_NODE_TEST_ARTEFACTS") or tmp_path / "artefacts") / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots: {folder}")
    return folder


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Jobs]]:
    """The dashboard on a free loopback port, on a filled job log: (its URL, the jobs)."""
    data_dir = tmp_path / "data"
    joblog = JobLog(f"sqlite:///{data_dir / 'joblog.sqlite'}")
    jobs = fill_joblog(joblog, data_dir)
    server = DashboardServer(create_app(dashboard_config(data_dir), joblog), "127.0.0.1", 0)
    server.start()
    try:
        yield server.url, jobs
    finally:
        server.stop()
        joblog.close()


def test_a_qa_user_filters_opens_a_job_sees_views_and_plots_and_downloads_the_csv(served, artefacts, tmp_path):
    from playwright.sync_api import Route, expect, sync_playwright

    url, jobs = served
    outside: list[str] = []
    problems: list[str] = []

    def only_the_dashboard(route: Route) -> None:
        if route.request.url.startswith(url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            context.route("**/*", only_the_dashboard)
            page = context.new_page()
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)

            page.goto(f"{url}/jobs")
            expect(page).to_have_url(f"{url}/login?next=%2Fjobs")
            page.fill("input[name=username]", "quinn")
            page.fill("input[name=password]", PASSWORDS["quinn"])
            page.screenshot(path=artefacts / "1-login.png")
            page.click("button:has-text('Log in')")
            expect(page).to_have_url(f"{url}/jobs")
            expect(page.locator("table.jobs tbody tr")).to_have_count(5)

            page.fill("input[name=since]", "2026-11-21")
            page.fill("input[name=station]", "MG2")
            page.select_option("select[name=flagged]", "yes")
            page.click("button:has-text('Filter')")
            expect(page).to_have_url(FILTERED)
            expect(page.locator("table.jobs tbody tr")).to_have_count(1)
            page.screenshot(path=artefacts / "2-jobs-filtered.png", full_page=True)

            page.click(f"a[href='/jobs/{jobs.held}']")
            expect(page.locator("h1")).to_contain_text(f"Job {jobs.held}")
            page.wait_for_function(ALL_IMAGES_LOADED)
            widths = page.eval_on_selector_all(".views img", LOADED_WIDTHS)
            assert len(widths) == 3 and all(width > 0 for width in widths), widths
            expect(page.locator("tr.flagged")).to_contain_text("noise_after")
            expect(page.locator("form[action$='/retry']")).to_have_count(0)  # QA reads only
            page.screenshot(path=artefacts / "3-job.png", full_page=True)

            page.click("nav >> text=Trends")
            page.wait_for_function(ALL_IMAGES_LOADED)
            widths = page.eval_on_selector_all("figure.plot img", LOADED_WIDTHS)
            assert len(widths) == 5 and all(width > 0 for width in widths), widths
            page.screenshot(path=artefacts / "4-trends.png", full_page=True)

            page.go_back()
            page.go_back()
            expect(page).to_have_url(FILTERED)
            with page.expect_download() as download_info:
                page.click("a:has-text('CSV of all')")
            download = download_info.value
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            context.close()
        finally:
            browser.close()

    assert saved.name.startswith("jobs-") and saved.suffix == ".csv"
    with saved.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(int(row["job"]), row["station_name"], row["flagged_figures"]) for row in rows] == [
        (jobs.held, "MG2", "noise_after")
    ]
    assert outside == [], "the pages asked for something beyond the dashboard"
    assert problems == [], "the browser reported errors (a blocked resource, a CSP violation)"
