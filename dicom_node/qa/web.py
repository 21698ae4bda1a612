"""The QA web dashboard: jobs, one job with its history and views, trends, CSV, /healthz, /metrics.

Pages are rendered on the server (Jinja2, autoescaped) with one bundled stylesheet and SVG plots
drawn by matplotlib, so they work with no internet and no JavaScript. Everyone logs in; `qa`
users read, `admin` users may also retry, cancel, resend, reprocess and release jobs through the
same `JobLog` methods the CLI calls (POST forms with a per-session CSRF token). Filters are query
parameters, so a filtered list is a bookmark and its CSV link carries the same filters. /healthz
and /metrics answer without a login: monitoring scrapes them, and they show counts only.

`serve` runs the app with `DashboardServer`, in a thread of its own process, on its own port.
"""

from __future__ import annotations

import csv
import functools
import io
import ipaddress
import logging
import math
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp

from dicom_node.config import Config
from dicom_node.console import strict_json
from dicom_node.errors import ConfigurationError, InputRefused, Unavailable
from dicom_node.imaging.thumbnails import THUMBNAIL_KINDS, thumbnail_dir
from dicom_node.joblog import Change, JobFilter, JobLog, JobSnapshot, JobStatus
from dicom_node.joblog.tables import Job
from dicom_node.qa import plots
from dicom_node.qa.auth import DUMMY_HASH, session_secret, verify_password

log = logging.getLogger("dicom_node.qa.web")

HERE = Path(__file__).parent
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
TRENDS_DEFAULT_DAYS = 30
ACTIONS = ("retry", "cancel", "resend", "reprocess", "release")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


# --- who is asking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    """What every request needs, kept on `app.state`."""

    config: Config
    joblog: JobLog
    clock: Callable[[], float]
    templates: Jinja2Templates


@dataclass(frozen=True)
class User:
    name: str
    role: str
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginRequired(Exception):
    """No valid login: the page is answered by a redirect to the login form."""


def dashboard(request: Request) -> Dashboard:
    return cast(Dashboard, request.app.state.dashboard)


Board = Annotated[Dashboard, Depends(dashboard)]


def current_user(request: Request, board: Board) -> User:
    """The logged-in user: named in the configuration now (a removed user is out at once), with a
    login younger than `session_minutes` (the cookie alone is renewed on every response)."""
    session = request.session
    name, login_at, csrf = session.get("user"), session.get("login_at"), session.get("csrf")
    account = board.config.dashboard.users.get(name) if isinstance(name, str) else None
    age = board.clock() - login_at if isinstance(login_at, int | float) else math.inf
    if account is None or not isinstance(csrf, str) or not 0 <= age <= board.config.dashboard.session_minutes * 60:
        expired = account is not None
        session.clear()
        if expired:
            session["flash"] = {"text": "Your session expired; please log in again.", "ok": False}
        raise LoginRequired
    return User(cast(str, name), account.role, csrf)


LoggedIn = Annotated[User, Depends(current_user)]


def admin_user(user: LoggedIn) -> User:
    if not user.is_admin:
        raise HTTPException(403, f"{user.name} has the qa role: only an admin may change jobs.")
    return user


Admin = Annotated[User, Depends(admin_user)]


def check_csrf(user: User, token: str) -> None:
    if not secrets.compare_digest(token.encode(), user.csrf.encode()):
        raise HTTPException(403, "This form has expired (its security token does not match); reload the page.")


def _safe_next(target: str) -> str:
    """Only a path on this site (never //host or a scheme): a login link cannot send anyone away."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/jobs"


# --- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The job filters of a page, as its query string carries them."""

    since: date | None = None
    until: date | None = None  # inclusive: the whole UTC day
    station: str = ""
    detector: str = ""
    status: str = ""
    profile: str = ""
    flagged: str = ""  # "", "yes" or "no"

    def job_filter(self) -> JobFilter:
        return JobFilter(
            status=self.status or None,
            since=_midnight(self.since),
            until=_midnight(self.until + timedelta(days=1)) if self.until else None,
            station=self.station or None,
            detector=self.detector or None,
            profile=self.profile or None,
            flagged={"yes": True, "no": False}.get(self.flagged),
        )

    def query(self, **extra: Any) -> str:
        """The query string of these filters (and `extra`), empty ones left out."""
        params = {
            "since": self.since.isoformat() if self.since else "",
            "until": self.until.isoformat() if self.until else "",
            "station": self.station,
            "detector": self.detector,
            "status": self.status,
            "profile": self.profile,
            "flagged": self.flagged,
            **extra,
        }
        return urlencode({key: value for key, value in params.items() if value not in ("", None)})


def _midnight(day: date | None) -> datetime | None:
    return None if day is None else datetime(day.year, day.month, day.day, tzinfo=UTC)


def _day(name: str, text: str | None) -> date | None:
    if not text:
        return None
    if _DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise HTTPException(400, f"{name}: expected a date like 2026-12-01 (UTC), got {text!r}.")


def filters(
    since: str | None = None,
    until: str | None = None,
    station: str = "",
    detector: str = "",
    status: str = "",
    profile: str = "",
    flagged: str = "",
) -> Filters:
    """Filters from the query string; a bad value is a 400 that says which and why."""
    first, last = _day("since", since), _day("until", until)
    if first and last and first > last:
        raise HTTPException(400, f"since: the period starts ({first}) after it ends ({last}).")
    if status and status not in JobStatus.__members__:
        raise HTTPException(400, f"status: expected one of {', '.join(JobStatus.__members__)}, got {status!r}.")
    if flagged not in ("", "yes", "no"):
        raise HTTPException(400, f"flagged: expected yes or no, got {flagged!r}.")
    return Filters(first, last, station.strip(), detector.strip(), status, profile.strip(), flagged)


Filtered = Annotated[Filters, Depends(filters)]


# --- presentation ----------------------------------------------------------------------------


def _utc(moment: datetime | None) -> str:
    return "–" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: Any, digits: int = 4) -> str:
    """A figure as text; NaN, infinity and anything not a number as a dash."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def _seconds(value: Any) -> str:
    """A duration as a person reads it: 0.25 s, 3.2 s, 8 min 05 s, 2 h 10 min, 6 d 3 h."""
    text = _number(value, 3)
    if text == "–" or value < 60:
        return text if text == "–" else f"{text} s"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(utc=_utc, num=_number, secs=_seconds)
    return templates


def render(request: Request, name: str, user: User | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page, with the user and the message of the last action (shown once)."""
    flash = request.session.pop("flash", None)
    return dashboard(request).templates.TemplateResponse(
        request, name, {"user": user, "flash": flash, **context}, status_code=status_code
    )


def flagged_figures(job: JobSnapshot) -> set[str]:
    return {str(flag.get("figure")) for flag in job.qc_flags or () if isinstance(flag, dict)}


# --- pages -----------------------------------------------------------------------------------

router = APIRouter()


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, board: Board, next: str = "/jobs") -> HTMLResponse:
    return render(request, "login.html", None, next=_safe_next(next), insecure=_cookie_lost(request, board))


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    board: Board,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/jobs",
) -> Response:
    account = board.config.dashboard.users.get(username)
    if not verify_password(password, account.password_hash if account else DUMMY_HASH) or account is None:
        log.warning("dashboard: failed login as %r from %s", username, request.client.host if request.client else "?")
        return render(
            request,
            "login.html",
            None,
            status_code=401,
            next=_safe_next(next),
            error="Unknown user or wrong password.",
            insecure=_cookie_lost(request, board),
        )
    request.session.clear()
    request.session.update(user=username, login_at=board.clock(), csrf=secrets.token_urlsafe(32))
    log.info("dashboard: %s (%s) logged in", username, account.role)
    return RedirectResponse(_safe_next(next), status_code=303)


def _cookie_lost(request: Request, board: Board) -> bool:
    """Served over plain HTTP off loopback, the browser drops the Secure-only session cookie."""
    return request.url.scheme == "http" and not _loopback(board.config.dashboard.bind)


@router.post("/logout")
def logout(request: Request, user: LoggedIn, csrf: Annotated[str, Form()]) -> RedirectResponse:
    check_csrf(user, csrf)
    request.session.clear()
    request.session["flash"] = {"text": "Logged out.", "ok": True}
    return RedirectResponse("/login", status_code=303)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    board: Board,
    user: LoggedIn,
    chosen: Filtered,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
) -> HTMLResponse:
    where = chosen.job_filter()
    total = board.joblog.count_jobs(where)
    found = board.joblog.list_jobs(where, limit=per_page, offset=(page - 1) * per_page)
    pages = max(1, math.ceil(total / per_page))
    return render(
        request,
        "jobs.html",
        user,
        jobs=found,
        filters=chosen,
        total=total,
        page=page,
        pages=pages,
        per_page=per_page,
        first=(page - 1) * per_page + 1,
        previous_url=f"/jobs?{chosen.query(page=page - 1, per_page=per_page)}" if page > 1 else None,
        next_url=f"/jobs?{chosen.query(page=page + 1, per_page=per_page)}" if page < pages else None,
        choices=_choices(board.joblog),
        statuses=[s.value for s in JobStatus],
        flagged_figures=flagged_figures,
    )


def _choices(joblog: JobLog) -> dict[str, list[str]]:
    """Values seen in the job log, offered as suggestions in the filter form."""
    columns = {
        "station": (Job.station_name, Job.calling_ae),
        "detector": (Job.detector_serial,),
        "profile": (Job.profile,),
    }
    with joblog.reading() as session:
        return {
            name: sorted({v for column in cols for v in session.scalars(select(column).distinct()) if v})
            for name, cols in columns.items()
        }


CSV_COLUMNS = (
    "job",
    "received_at_utc",
    "status",
    "station_name",
    "calling_ae",
    "detector_serial",
    "profile",
    "pipeline",
    "model_name",
    "attempts",
    "decode_s",
    "restore_s",
    "derive_s",
    "flagged_figures",
    "last_error",
    "sop_instance_uid",
    "study_instance_uid",
    "derived_sop_instance_uid",
)


@router.get("/jobs.csv")
def jobs_csv(board: Board, user: LoggedIn, chosen: Filtered) -> Response:
    """Every job of the filter (no paging), one row each, with one column per QC figure."""
    found = board.joblog.list_jobs(chosen.job_filter(), limit=None)
    figures = sorted({name for job in found for name in job.qc or {}})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*CSV_COLUMNS, *(f"qc_{name}" for name in figures)])
    for job in found:
        writer.writerow(
            [
                job.id,
                _utc(job.received_at),
                job.status.value,
                *map(
                    _cell,
                    (job.station_name, job.calling_ae, job.detector_serial, job.profile, job.pipeline, job.model_name),
                ),
                job.attempts,
                *map(_csv_number, (job.decode_s, job.restore_s, job.derive_s)),
                " ".join(sorted(flagged_figures(job))),
                _cell(job.last_error),
                job.sop_instance_uid,
                job.study_instance_uid,
                job.derived_sop_instance_uid or "",
                *(_csv_number((job.qc or {}).get(name)) for name in figures),
            ]
        )
    stamp = datetime.fromtimestamp(board.clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="jobs-{stamp}.csv"'},
    )


def _cell(text: str | None) -> str:
    """Text from DICOM headers, kept from being read as a formula by a spreadsheet."""
    text = text or ""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_number(value: Any) -> str:
    return "" if _number(value) == "–" else repr(float(value))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, board: Board, user: LoggedIn, job_id: int) -> HTMLResponse:
    job = _job(board, job_id)
    deliveries = board.joblog.deliveries(job_id)
    thresholds = board.config.qc.effective_thresholds
    flagged = flagged_figures(job)
    views = thumbnail_dir(board.config.data_dir, job_id)
    return render(
        request,
        "job.html",
        user,
        job=job,
        deliveries=deliveries,
        events=board.joblog.events(job_id),
        timeline=_timeline(job, [d.sent_at for d in deliveries if d.sent_at is not None]),
        qc=[
            (name, value, thresholds.get(name), name in flagged)
            for name, value in sorted((job.qc or {}).items(), key=lambda item: (item[0] not in flagged, item[0]))
        ],
        thumbnails=[kind for kind in THUMBNAIL_KINDS if (views / f"{kind}.png").is_file()],
        destinations=[d.name for d in board.config.destinations],
        actions=ACTIONS,
    )


def _job(board: Dashboard, job_id: int) -> JobSnapshot:
    job = board.joblog.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"There is no job {job_id}.")
    return job


def _timeline(job: JobSnapshot, sent: list[datetime]) -> list[tuple[str, datetime | None, float | None, Any]]:
    """(stage, when, seconds since the stage before, the stage's recorded duration) for each stage."""
    stages = [
        ("received", job.received_at, None),
        ("claimed", job.claimed_at, None),
        ("decoded", job.decoded_at, job.decode_s),
        ("restored", job.restored_at, job.restore_s),
        ("derived", job.derived_at, job.derive_s),
        ("sent", max(sent, default=None), None),
    ]
    rows: list[tuple[str, datetime | None, float | None, Any]] = []
    previous: datetime | None = None
    for stage, at, recorded in stages:
        since = (at - previous).total_seconds() if at and previous else None
        rows.append((stage, at, since, recorded))
        previous = at or previous
    return rows


@router.get("/jobs/{job_id}/views/{kind}.png")
def thumbnail(board: Board, user: LoggedIn, job_id: int, kind: str) -> FileResponse:
    path = thumbnail_dir(board.config.data_dir, job_id) / f"{kind}.png"
    if kind not in THUMBNAIL_KINDS or not path.is_file():
        raise HTTPException(404, f"Job {job_id} has no {kind} view.")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.post("/jobs/{job_id}/{action}")
def job_action(
    request: Request,
    board: Board,
    user: Admin,
    job_id: int,
    action: str,
    csrf: Annotated[str, Form()],
    to: Annotated[list[str] | None, Form()] = None,
) -> RedirectResponse:
    """An admin's change to a job, by the JobLog method the CLI calls; its message is shown next."""
    check_csrf(user, csrf)
    if action not in ACTIONS:
        raise HTTPException(404, f"There is no action {action!r}; expected one of {', '.join(ACTIONS)}.")
    _job(board, job_id)
    known = {d.name for d in board.config.destinations}
    unknown = sorted(set(to or ()) - known)
    if unknown:
        raise HTTPException(400, f"to: no destination {', '.join(unknown)}.")
    actor = f"dashboard {user.name}"
    joblog = board.joblog
    run: dict[str, Callable[[], Change]] = {
        "retry": lambda: joblog.retry(job_id, actor=actor),
        "cancel": lambda: joblog.cancel(job_id, actor=actor),
        "resend": lambda: joblog.resend(job_id, to or None, actor=actor),
        "reprocess": lambda: joblog.reprocess(job_id, actor=actor),
        "release": lambda: joblog.release(job_id, actor=actor),
    }
    try:
        change = run[action]()
        flash = {"text": change.message, "ok": change.changed}
    except InputRefused as exc:
        flash = {"text": str(exc), "ok": False}
    log.info("dashboard: %s asked to %s job %s: %s", user.name, action, job_id, flash["text"])
    request.session["flash"] = flash
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/trends", response_class=HTMLResponse)
def trends_page(request: Request, board: Board, user: LoggedIn, chosen: Filtered) -> HTMLResponse:
    """The plots of one period (the last 30 days unless the filter names one)."""
    if chosen.since is None and chosen.until is None:
        today = datetime.fromtimestamp(board.clock(), UTC).date()
        chosen = replace(chosen, since=today - timedelta(days=TRENDS_DEFAULT_DAYS))
    return render(
        request,
        "trends.html",
        user,
        filters=chosen,
        plots=[(name, f"/plots/{name}.svg?{chosen.query()}") for name in plots.PLOTS if name != "phantom"],
        phantom_url=f"/plots/phantom.svg?{chosen.query()}"
        if plots.phantom_points(board.joblog, chosen.job_filter())
        else None,
        choices=_choices(board.joblog),
        statuses=[s.value for s in JobStatus],
    )


@router.get("/plots/{name}.svg")
def plot(board: Board, user: LoggedIn, chosen: Filtered, name: str) -> Response:
    draw = plots.PLOTS.get(name)
    if draw is None:
        raise HTTPException(404, f"There is no plot {name!r}.")
    svg = draw(board.joblog, chosen.job_filter(), board.config)
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "private, max-age=60"})


@router.get("/healthz")
def healthz(board: Board) -> Response:
    """For monitoring: the job log answers, and how many jobs are in each state (no login)."""
    try:
        with board.joblog.reading() as session:
            rows = session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all()
        counts = {status: count for status, count in rows}
    except SQLAlchemyError as exc:
        log.error("dashboard: /healthz cannot read the job log: %s", exc)
        body: dict[str, Any] = {"status": "error", "database": "unreachable", "error": type(exc).__name__}
        return Response(strict_json(body), status_code=503, media_type="application/json")
    jobs = {status.value: int(counts.get(status, 0)) for status in JobStatus}
    body = {"status": "ok", "database": "reachable", "jobs": jobs, "total": sum(jobs.values())}
    return Response(strict_json(body), media_type="application/json")


# --- the app ---------------------------------------------------------------------------------


def create_app(config: Config, joblog: JobLog, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """The dashboard on `joblog`; `clock` (seconds since the epoch) is what session expiry reads."""
    app = FastAPI(title="dicom-node QA dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dashboard = Dashboard(config, joblog, clock, _templates())
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(config.data_dir),
        session_cookie="dicom_node_dashboard",
        max_age=int(config.dashboard.session_minutes * 60),
        same_site="strict",
        https_only=not _loopback(config.dashboard.bind),
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def error_page(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(request, exc.status_code, [str(exc.detail)])

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        return _error(request, 422, [_validation_message(error) for error in exc.errors()])

    @functools.cache
    def registry() -> CollectorRegistry:
        from dicom_node.qa.metrics import build_registry

        return build_registry(config, joblog)

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics of the job log (no login), collected afresh on each scrape."""
        return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app


def _error(request: Request, status: int, messages: Iterable[str]) -> Response:
    """An error as a page (for people) — /healthz and /metrics never raise one."""
    return render(request, "error.html", None, status_code=status, status=status, messages=list(messages))


def _validation_message(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
    return f"{where}: {error.get('msg', 'invalid')}"


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- serving ---------------------------------------------------------------------------------


class DashboardServer:
    """An ASGI app served by uvicorn in a thread: what `serve` runs the dashboard with.

    The socket is bound before the thread starts, so a port in use is a `ConfigurationError` of
    one line in the caller, not a traceback in a thread."""

    STARTUP_S = 10.0

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        import uvicorn

        self.host = host
        # log_config None: uvicorn's records go through the node's own logging set-up
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None))
        self.socket = _listen(host, port)
        self.port = int(self.socket.getsockname()[1])
        self.thread = threading.Thread(target=self._run, name="dashboard", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + self.STARTUP_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"dashboard did not start on {self.host}:{self.port}; see the log above")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.socket.close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigurationError(f"[dashboard] bind {host!r}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"dashboard cannot listen on {host}:{port}: {exc.strerror or exc} (another program on that port? "
            "change [dashboard] port)"
        ) from exc
    return sock


def start_dashboard(config: Config, joblog: JobLog) -> DashboardServer:
    """Serve the dashboard of `config` on its bind address and port; stop it with `.stop()`."""
    server = DashboardServer(create_app(config, joblog), config.dashboard.bind, config.dashboard.port)
    server.start()
    log.info("dashboard on %s/", server.url)
    return server
