"""The QA web dashboard through its HTTP API: logins and roles, every page, filters and paging, the
admin actions (and QA's 403), CSV, /healthz, /metrics, the `hash-password` command, and `serve`
starting it on its own port."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from qa_fixtures import FLAG, PASSWORDS, Jobs, dashboard_config, fill_joblog

from dicom_node.cli import main
from dicom_node.config import Config, parse_config
from dicom_node.errors import ConfigurationError
from dicom_node.joblog import JobFilter, JobLog, JobStatus
from dicom_node.joblog.tables import QaSession
from dicom_node.qa.auth import SECRET_FILE, hash_password, verify_password
from dicom_node.qa.plots import phantom_points
from dicom_node.qa.web import ACTIONS, DashboardServer, create_app

PAGES = ("/jobs", "/trends", "/jobs.csv", "/plots/qc.svg")
PLOTS = ("stage-times", "images-per-day", "qc", "failures", "phantom")


class Clock:
    """The dashboard's clock, moved by hand: session expiry without waiting."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def joblog(data_dir: Path) -> Iterator[JobLog]:
    log = JobLog(f"sqlite:///{data_dir / 'joblog.sqlite'}")
    yield log
    log.close()


@pytest.fixture
def jobs(joblog: JobLog, data_dir: Path) -> Jobs:
    return fill_joblog(joblog, data_dir)


@pytest.fixture
def config(data_dir: Path) -> Config:
    return dashboard_config(data_dir, session_minutes=30)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(config: Config, joblog: JobLog, jobs: Jobs, clock: Clock) -> TestClient:
    """Not logged in (`login(client, name)` logs it in)."""
    return TestClient(create_app(config, joblog, clock=clock))


def credentials(user: str) -> dict[str, str]:
    return {"username": user, "password": PASSWORDS[user]}


def login(client: TestClient, user: str, password: str | None = None) -> httpx2.Response:
    return client.post(
        "/login",
        data={"username": user, "password": password or PASSWORDS[user], "next": "/jobs"},
        follow_redirects=False,
    )


@pytest.fixture
def as_user(client: TestClient) -> Callable[[str], TestClient]:
    def logged_in(user: str) -> TestClient:
        assert login(client, user).status_code == 303
        return client

    return logged_in


def job_ids(page: str) -> list[int]:
    """The jobs a list page links to, in order."""
    return [int(n) for n in re.findall(r'<td><a href="/jobs/(\d+)">', page)]


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


# --- logins, sessions, roles -------------------------------------------------------------------


@pytest.mark.parametrize("path", [*PAGES, "/jobs/1", "/jobs/1/views/before.png"])
def test_every_page_needs_a_login(client, path):
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")
    assert client.get(path).url.path == "/login"


def test_login_with_a_wrong_password_or_unknown_user_is_refused_with_a_message(client):
    for user, password in (("quinn", "wrong-password"), ("nobody", PASSWORDS["quinn"]), ("ada", PASSWORDS["quinn"])):
        response = login(client, user, password)
        assert response.status_code == 401
        assert "Unknown user or wrong password." in response.text
    assert client.get("/jobs", follow_redirects=False).status_code == 303


def test_login_sets_a_strict_http_only_cookie_and_logout_needs_the_csrf_token(client):
    response = login(client, "quinn")
    assert response.headers["location"] == "/jobs"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # loopback: plain HTTP
    page = client.get("/jobs")
    assert page.status_code == 200 and "quinn (qa)" in page.text
    assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert client.get("/jobs").status_code == 200
    response = client.post("/logout", data={"csrf": csrf_of(page.text)})
    assert response.url.path == "/login" and "Logged out." in response.text
    assert client.get("/jobs", follow_redirects=False).status_code == 303


def test_login_goes_back_to_the_page_asked_for_but_never_off_the_site(client, jobs):
    wanted = f"/jobs/{jobs.held}"
    assert client.get(wanted).url.params["next"] == wanted
    for target, lands in ((wanted, wanted), ("//evil.example/x", "/jobs"), ("https://evil.example/", "/jobs")):
        client.cookies.clear()
        response = client.post("/login", data={**credentials("quinn"), "next": target}, follow_redirects=False)
        assert response.headers["location"] == lands


def test_a_session_expires_after_session_minutes_even_when_used(as_user, clock):
    client = as_user("quinn")
    clock.now += 29 * 60
    assert client.get("/jobs").status_code == 200  # renews the cookie, not the login
    clock.now += 2 * 60
    response = client.get("/jobs")
    assert response.url.path == "/login"
    assert "Your session expired; please log in again." in response.text
    assert client.get("/jobs", follow_redirects=False).status_code == 303


def test_sessions_survive_a_restart_through_the_kept_secret(config, joblog, jobs, clock, data_dir):
    first = TestClient(create_app(config, joblog, clock=clock))
    assert login(first, "ada").status_code == 303
    secret = data_dir / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    second = TestClient(create_app(config, joblog, clock=clock))
    second.cookies = first.cookies
    assert second.get("/jobs").status_code == 200
    secret.unlink()  # deleting the secret logs everybody out
    third = TestClient(create_app(config, joblog, clock=clock))
    third.cookies = first.cookies
    assert third.get("/jobs", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("user", ["quinn", "ada"])
def test_every_page_answers_for_each_role(as_user, jobs, user):
    client = as_user(user)
    listing = client.get("/jobs")
    assert listing.status_code == 200
    assert job_ids(listing.text) == [jobs.queued, jobs.forwarding, jobs.failed, jobs.held, jobs.done]
    for job_id in job_ids(listing.text):
        page = client.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and f"Job {job_id}" in page.text
        assert (f'action="/jobs/{job_id}/retry"' in page.text) == (user == "ada")  # only admins get the forms
    for kind in ("before", "after", "difference"):
        image = client.get(f"/jobs/{jobs.done}/views/{kind}.png")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    trends = client.get("/trends")
    assert trends.status_code == 200
    for name in PLOTS:
        assert f"/plots/{name}.svg?since=2026-11-01" in trends.text
        svg = client.get(f"/plots/{name}.svg", params={"since": "2026-11-01"})
        assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
        assert b"<svg" in svg.content[:1000]
    assert client.get("/jobs.csv").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_pages_send_headers_that_keep_them_in_their_own_frame_and_origin(as_user):
    response = as_user("quinn").get("/jobs")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


# --- the job list ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        ({"station": "MG2"}, ["queued", "held"]),
        ({"station": "MAMMO1"}, ["forwarding", "failed", "done"]),  # the calling AE matches too
        ({"detector": "SN99"}, ["failed"]),
        ({"status": "failed"}, ["failed"]),
        ({"profile": "hold"}, ["held"]),
        ({"flagged": "yes"}, ["held"]),
        ({"flagged": "no"}, ["queued", "forwarding", "failed", "done"]),
        ({"until": "2026-11-20"}, ["done"]),  # the whole day, inclusive
        ({"since": "2026-11-25", "until": "2026-11-25"}, ["failed", "held"]),
        ({"since": "2026-11-26", "station": "MG1"}, ["forwarding"]),
        ({"since": "", "until": "", "station": "", "status": ""}, ["queued", "forwarding", "failed", "held", "done"]),
        ({"station": "NOWHERE"}, []),
    ],
)
def test_the_job_list_filters(as_user, jobs, query, expected):
    page = as_user("quinn").get("/jobs", params=query)
    assert page.status_code == 200
    assert job_ids(page.text) == [getattr(jobs, name) for name in expected]
    if not expected:
        assert "No jobs match these filters" in page.text


def test_the_job_list_pages_and_its_links_keep_the_filters(as_user, jobs):
    client = as_user("quinn")
    first = client.get("/jobs", params={"station": "MG1", "per_page": 2})
    assert job_ids(first.text) == [jobs.forwarding, jobs.failed]
    assert "Jobs 1–2 of 3" in first.text and "Page 1 of 2" in first.text
    older = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert older is not None
    second = client.get(older.group(1).replace("&amp;", "&"))
    assert job_ids(second.text) == [jobs.done]
    assert "Page 2 of 2" in second.text and 'rel="next"' not in second.text and 'rel="prev"' in second.text
    assert 'href="/jobs.csv?station=MG1"' in first.text


@pytest.mark.parametrize(
    "query, status, message",
    [
        ({"since": "2026-13-01"}, 400, "since: expected a date like 2026-12-01 (UTC), got &#39;2026-13-01&#39;"),
        ({"until": "yesterday"}, 400, "until: expected a date like"),
        ({"since": "2026-11-28", "until": "2026-11-20"}, 400, "the period starts (2026-11-28) after it ends"),
        ({"status": "lost"}, 400, "status: expected one of received, processing"),
        ({"flagged": "maybe"}, 400, "flagged: expected yes or no"),
        ({"per_page": "0"}, 422, "per_page: Input should be greater than or equal to 1"),
        ({"per_page": "100000"}, 422, "per_page: Input should be less than or equal to 500"),
        ({"page": "two"}, 422, "page: Input should be a valid integer"),
    ],
)
def test_bad_query_parameters_say_which_and_why(as_user, query, status, message):
    client = as_user("quinn")
    for path in ("/jobs", "/jobs.csv", "/trends"):
        if path != "/jobs" and "page" in "".join(query):
            continue  # paging is the list's alone
        response = client.get(path, params=query)
        assert response.status_code == status, path
        assert message in response.text


def test_unknown_jobs_views_plots_and_pages_are_404_pages(as_user, jobs):
    client = as_user("quinn")
    for path, message in (
        ("/jobs/999", "There is no job 999."),
        (f"/jobs/{jobs.failed}/views/before.png", f"Job {jobs.failed} has no before view."),
        (f"/jobs/{jobs.done}/views/secret.png", "has no secret view"),
        ("/plots/nothing.svg", "There is no plot &#39;nothing&#39;."),
        ("/nowhere", "Not Found"),
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert message in response.text and "<h1>Not found (404)</h1>" in response.text


# --- one job -----------------------------------------------------------------------------------


def test_a_job_page_shows_timeline_qc_thresholds_uids_views_and_history(as_user, jobs):
    page = as_user("quinn").get(f"/jobs/{jobs.held}").text
    for stage in ("received", "claimed", "decoded", "restored", "derived", "sent"):
        assert f"<td>{stage}</td>" in page
    assert re.search(r"<td>restored</td><td>2026-\d\d-\d\d \d\d:\d\d:\d\d</td><td class=\"n\">[^<]+ s</td>", page)
    assert '<td class="n">3.2 s</td>' in page  # the restore stage's recorded duration
    assert "At (UTC)" in page and "All times are UTC." in page
    flagged_row = re.search(r'<tr class="flagged">\s*<td>noise_after</td>(.*?)</tr>', page, re.S)
    assert flagged_row is not None
    assert re.findall(r'<td class="n">([^<]+)</td>', flagged_row.group(1)) == ["1.6", "0.75", "1.3"]
    assert FLAG["message"] in page
    assert re.search(r"<td>mean_ratio</td><td class=\"n\">1.001</td>\s*<td class=\"n\">0.98</td>", page)
    for uid in ("1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.2.1", f"2.25.{jobs.held}"):
        assert f"<td>{uid}</td>" in page
    for kind in ("before", "after", "difference"):
        assert f'src="/jobs/{jobs.held}/views/{kind}.png"' in page
    assert "qc-flagged" in page and "held until released" in page


def test_a_job_page_shows_nan_as_a_dash_and_missing_views_as_a_sentence(as_user, jobs):
    client = as_user("quinn")
    forwarding = client.get(f"/jobs/{jobs.forwarding}").text
    assert re.search(r'<td>snr_after</td><td class="n">–</td>', forwarding)
    failed = client.get(f"/jobs/{jobs.failed}").text
    assert "No views of this job" in failed and "Last error: no noise parameters for detector SN99" in failed


def test_text_from_dicom_headers_is_escaped_on_pages_and_defused_in_csv(as_user, joblog):
    joblog.record_received(
        sop_instance_uid="1.2.3.9",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="EVIL",
        called_ae="DOSENODE",
        peer_host=None,
        station_name='<script>alert("x")</script>',
        detector_serial="=HYPERLINK(1)",
        profile="default",
        input_path="/spool/9.dcm",
        input_sha256="9" * 64,
        input_bytes=9,
    )
    client = as_user("quinn")
    for path in ("/jobs", "/jobs/6"):
        page = client.get(path).text
        assert "<script>" not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    row = next(csv.DictReader(io.StringIO(client.get("/jobs.csv", params={"station": "EVIL"}).text)))
    assert row["detector_serial"] == "'=HYPERLINK(1)"


# --- trends ------------------------------------------------------------------------------------


def test_trends_read_phantom_results_defensively_and_say_when_there_are_none(as_user, joblog, jobs):
    with joblog.engine.begin() as connection:  # results another version might have written
        for result in ([1, 2], {"doses": "none"}, {"doses": [3, {"dose_fraction": "half"}], "full_dose": None}):
            at = datetime(2026, 11, 22, tzinfo=UTC)
            connection.execute(
                QaSession.__table__.insert(),
                {
                    "rule": "weekly-phantom",
                    "detector_serial": "SN42",
                    "first_image_at": at,
                    "last_image_at": at,
                    "status": "evaluated",
                    "attempts": 1,
                    "evaluated_at": at,
                    "result": result,
                },
            )
    points = phantom_points(joblog, JobFilter(since=datetime(2026, 11, 1, tzinfo=UTC)))
    assert sorted({(p.series, p.restored) for p in points}) == [
        ("SN42 at 0.25 dose", False),
        ("SN42 at 0.5 dose", False),
        ("SN42 at 0.5 dose", True),
        ("SN42 full dose", True),
    ]
    assert [p.value for p in points if p.series == "SN42 at 0.25 dose"] == [4.0, 4.0]  # rn of two sessions; b2 null
    client = as_user("quinn")
    assert 'src="/plots/phantom.svg?since=2026-11-01"' in client.get("/trends").text
    assert client.get("/plots/phantom.svg").status_code == 200
    later = client.get("/trends", params={"since": "2026-11-26"}).text
    assert "No evaluated phantom QA sessions in this period." in later and "phantom.svg" not in later
    assert "From 2026-11-26 to today (UTC)" in later
    for name in PLOTS:  # an empty filter draws plots that say so, never an error
        assert client.get(f"/plots/{name}.svg", params={"station": "NOWHERE"}).status_code == 200


# --- admin actions -----------------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
def test_qa_users_get_403_on_every_action_and_nothing_changes(as_user, joblog, jobs, action):
    client = as_user("quinn")
    token = csrf_of(client.get("/jobs").text)
    before = [(job.status, len(joblog.events(job.id))) for job in joblog.list_jobs(limit=None)]
    for job_id in (jobs.held, jobs.failed, jobs.done):
        response = client.post(f"/jobs/{job_id}/{action}", data={"csrf": token}, follow_redirects=False)
        assert response.status_code == 403
        assert "quinn has the qa role: only an admin may change jobs." in response.text
    assert [(job.status, len(joblog.events(job.id))) for job in joblog.list_jobs(limit=None)] == before


def act(client: TestClient, job_id: int, action: str, **form: object) -> httpx2.Response:
    """Post an action as the job page's form does, and follow the redirect back to the job."""
    token = csrf_of(client.get(f"/jobs/{job_id}").text)
    response = client.post(f"/jobs/{job_id}/{action}", data={"csrf": token, **form}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/jobs/{job_id}"
    return client.get(response.headers["location"])


def test_admin_actions_change_jobs_through_the_joblog_and_say_what_they_did(as_user, joblog, jobs):
    client = as_user("ada")
    page = act(client, jobs.held, "release")
    assert "job 2: released: 1 held sends queued" in page.text
    assert joblog.get_job(jobs.held).status == JobStatus.forwarding
    assert "job 2: released" not in client.get(f"/jobs/{jobs.held}").text.split("<h2>")[0]  # said once
    act(client, jobs.queued, "cancel")
    assert joblog.get_job(jobs.queued).status == JobStatus.cancelled
    act(client, jobs.failed, "retry")
    assert joblog.get_job(jobs.failed).status == JobStatus.received
    page = act(client, jobs.forwarding, "resend", to=["archive"])
    assert "derived image queued to archive" in page.text
    assert [d.destination for d in joblog.deliveries(jobs.forwarding)] == ["pacs", "archive"]
    act(client, jobs.done, "reprocess")
    assert joblog.get_job(jobs.done).status == JobStatus.received
    actors = {
        e.actor for job_id in (jobs.held, jobs.queued, jobs.failed, jobs.forwarding) for e in joblog.events(job_id)
    }
    assert "dashboard ada" in actors


def test_an_action_that_changes_nothing_or_is_refused_says_why(as_user, joblog, jobs):
    client = as_user("ada")
    page = act(client, jobs.done, "retry")
    assert "job 1 is done: nothing to retry" in page.text and 'class="flash warn"' in page.text
    page = act(client, jobs.queued, "resend")
    assert "job 5 has no derived image to send (it is received); try reprocess" in page.text
    assert (
        client.post(f"/jobs/{jobs.done}/resend", data={"csrf": csrf_of(page.text), "to": "nowhere"}).status_code == 400
    )


def test_admin_actions_need_the_sessions_csrf_token(as_user, joblog, jobs):
    client = as_user("ada")
    assert client.post(f"/jobs/{jobs.queued}/cancel", data={"csrf": "forged"}).status_code == 403
    assert client.post(f"/jobs/{jobs.queued}/cancel").status_code == 422
    assert joblog.get_job(jobs.queued).status == JobStatus.received
    token = csrf_of(client.get("/jobs").text)
    assert client.post(f"/jobs/{jobs.queued}/explode", data={"csrf": token}).status_code == 404
    assert client.post("/jobs/999/cancel", data={"csrf": token}).status_code == 404


# --- CSV, health, metrics ----------------------------------------------------------------------


def test_csv_export_holds_every_job_of_the_filter_with_a_header_row(as_user, jobs):
    client = as_user("quinn")
    response = client.get("/jobs.csv", params={"station": "MG1", "per_page": 1})
    assert response.headers["content-type"].startswith("text/csv")
    assert re.fullmatch(r'attachment; filename="jobs-20261201T120000Z.csv"', response.headers["content-disposition"])
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(row["job"]) for row in rows] == [jobs.forwarding, jobs.failed, jobs.done]
    assert {"received_at_utc", "status", "qc_noise_after", "qc_snr_after", "restore_s"} <= set(rows[0])
    forwarding, failed, done = rows
    assert forwarding["qc_snr_after"] == "" and float(done["qc_noise_after"]) == 1.02  # NaN: an empty cell
    assert failed["status"] == "failed" and failed["last_error"] == "no noise parameters for detector SN99"
    assert done["received_at_utc"] == "2026-11-20 09:30:00" and float(done["restore_s"]) == 3.2
    flagged = list(csv.DictReader(io.StringIO(client.get("/jobs.csv", params={"flagged": "yes"}).text)))
    assert [(int(r["job"]), r["flagged_figures"]) for r in flagged] == [(jobs.held, "noise_after")]
    empty = client.get("/jobs.csv", params={"station": "NOWHERE"}).text
    assert list(csv.reader(io.StringIO(empty)))[0][:3] == ["job", "received_at_utc", "status"]


def _no_constants(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def test_healthz_is_strict_json_with_counts_and_needs_no_login(client, jobs):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = json.loads(response.text, parse_constant=_no_constants)
    assert body["status"] == "ok" and body["database"] == "reachable" and body["total"] == 5
    assert body["jobs"] == {
        "received": 1,
        "processing": 0,
        "forwarding": 1,
        "held": 1,
        "done": 1,
        "failed": 1,
        "cancelled": 0,
    }


def test_healthz_says_when_the_job_log_is_unreachable(tmp_path, config):
    folder = tmp_path / "gone"
    joblog = JobLog(f"sqlite:///{folder / 'joblog.sqlite'}")
    client = TestClient(create_app(config, joblog))
    joblog.close()
    shutil.rmtree(folder)
    response = client.get("/healthz")
    assert response.status_code == 503
    body = json.loads(response.text, parse_constant=_no_constants)
    assert body["status"] == "error" and body["database"] == "unreachable"


def test_metrics_are_prometheus_text_on_the_same_port(client, jobs):
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    assert families and all(family.samples for family in families if family.type != "info")


# --- passwords and the hash-password command ---------------------------------------------------


def test_password_hashes_are_salted_scrypt_lines():
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second and first.startswith("scrypt$16384$8$1$") and first.count("$") == 5
    assert verify_password("correct horse", first) and verify_password("correct horse", second)
    assert not verify_password("correct hors", first)
    for malformed in ("", "plain", "md5$1$2$3$4$5", "scrypt$x$8$1$abc$def", first.rsplit("$", 1)[0] + "$"):
        assert not verify_password("correct horse", malformed)


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_hash_password_reads_stdin_when_it_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a long secret phrase\n"))
    code, out, err = run(capsys, "hash-password")
    assert code == 0
    line = out.strip()
    assert re.fullmatch(r'password_hash = "scrypt\$[^"]+"', line)
    assert verify_password("a long secret phrase", line.split('"')[1])
    assert "[dashboard.users.NAME]" in err
    parse_config({"dashboard": {"users": {"x": {"role": "qa", "password_hash": line.split('"')[1]}}}})


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_hash_password_asks_twice_on_a_terminal_and_refuses_short_or_differing_ones(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Terminal())
    answers = iter(["first password", "other password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    code, out, err = run(capsys, "hash-password")
    assert code == 2 and out == "" and err.strip() == "dicom-node: error: the two passwords differ; nothing was hashed"
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    code, out, err = run(capsys, "hash-password")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "at least 10 characters" in err


# --- serving -----------------------------------------------------------------------------------


def test_the_server_serves_on_its_port_and_a_port_in_use_is_one_line(config, joblog, jobs):
    server = DashboardServer(create_app(config, joblog), "127.0.0.1", 0)
    server.start()
    try:
        assert httpx2.get(f"{server.url}/healthz").json()["total"] == 5
        with pytest.raises(ConfigurationError) as info:
            DashboardServer(create_app(config, joblog), "127.0.0.1", server.port)
        message = str(info.value)
        assert f"dashboard cannot listen on 127.0.0.1:{server.port}: Address already in use" in message
        assert "\n" not in message
    finally:
        server.stop()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{server.url}/healthz")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_dashboard_port(config: Config, port: int) -> Config:
    """`config` with the dashboard on `port` and no worker processes (nothing here restores)."""
    return config.model_copy(
        update={
            "dashboard": config.dashboard.model_copy(update={"port": port}),
            "worker": config.worker.model_copy(update={"count": 0}),
        }
    )


def test_serve_starts_the_dashboard_when_enabled_and_stops_it(tmp_path, config):
    from dicom_node.node.service import Node

    port = free_port()
    node = Node(with_dashboard_port(config, port), port=0)
    node.start()
    try:
        assert httpx2.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
    finally:
        node.stop()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"http://127.0.0.1:{port}/healthz")


def test_serve_with_the_dashboard_port_in_use_stops_before_it_starts_anything(tmp_path, config):
    from dicom_node.node.service import Node

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = Node(with_dashboard_port(config, taken.getsockname()[1]), port=0)
        with pytest.raises(ConfigurationError, match="dashboard cannot listen on 127.0.0.1"):
            node.start()
    assert node.dashboard is None and not node.scheduler.running
    node.joblog.close()
