"""The one configuration loader: TOML validated by pydantic.

Every part of the node (serve, worker, process, calibrate, phantom) reads its settings through
`load_config`. A wrong key or value becomes a `ConfigurationError` whose text is one line naming the key,
so radiology IT can fix the file without reading a traceback.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigurationError
from dicom_node.files import DEFAULT_FILE_MODE

CONFIG_ENV = "DICOM_NODE_CONFIG"
"""Environment variable naming the configuration file when --config is not given."""

AeTitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]


def _octal_file_mode(value: object) -> int:
    """A file mode written as an octal string ("0640"); a TOML integer is refused, since 640 would be read
    as decimal. The node must read its own files, and images are never writable by everyone."""
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value.strip()):
        raise ValueError('must be an octal string such as "0640"')
    mode = int(value, 8)
    if not mode & 0o400:
        raise ValueError("the node must be able to read its own files (owner read, 0400)")
    if mode & 0o002:
        raise ValueError("files of patients' images must not be writable by everyone")
    return mode


FileMode = Annotated[int, BeforeValidator(_octal_file_mode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Strict):
    ae_title: AeTitle = "DOSENODE"
    port: int = Field(default=11112, ge=1, le=65535)
    bind: str = "0.0.0.0"
    data_dir: Path = Path("data")
    max_associations: int = Field(default=10, ge=1)
    acse_timeout_s: float = Field(default=30, gt=0)  # association negotiation
    dimse_timeout_s: float = Field(default=60, gt=0)  # waiting for a DIMSE message
    network_timeout_s: float = Field(default=60, gt=0)  # an idle association is closed after this
    min_free_disk_mb: float = Field(default=1024, ge=0)  # below this, new associations are refused
    duplicate_policy: Literal["ignore-identical", "reprocess-all"] = "ignore-identical"
    retention_days: float = Field(default=7, ge=0)  # files of finished jobs are kept this long
    model_dir: Path | None = None  # trained models for the "deep" pipeline (default: the shipped ones)
    file_mode: FileMode = DEFAULT_FILE_MODE  # spooled and outbox files ("0640": the node's group may read them)

    @field_validator("ae_title")
    @classmethod
    def _no_backslash(cls, value: str) -> str:
        if "\\" in value:
            raise ValueError("an AE title may not contain a backslash")
        return value.strip()


class DatabaseSettings(_Strict):
    url: str = ""  # empty: SQLite file in data_dir; a relative SQLite file is relative to the configuration file
    # SQLite: how long a writer waits for another's lock; the receiver answers 0xA700 after it
    busy_timeout_s: float = Field(default=30, gt=0)

    @field_validator("url")
    @classmethod
    def _parses(cls, url: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if url:
            try:
                make_url(url)
            except ArgumentError:
                raise ValueError("not a database URL (e.g. postgresql+psycopg://node@db/dicomnode)") from None
        return url


class Source(_Strict):
    ae_title: AeTitle
    hosts: list[str] = []  # CIDRs or addresses; empty: any host
    profile: str

    @field_validator("hosts")
    @classmethod
    def _valid_networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                ipaddress.ip_network(host, strict=True)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or CIDR network") from None
        return hosts


class Destination(_Strict):
    name: str = Field(min_length=1)
    ae_title: AeTitle | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    folder: Path | None = None
    timeout_s: float = Field(default=120, gt=0)  # watchdog: the longest one send may take
    # a PACS answering 0x0111 (duplicate SOP instance: it has this image already) has it: count it sent
    duplicate_is_delivered: bool = False
    # ask PACS to commit to each stored image (Storage Commitment, push model); sent only once it has
    storage_commitment: bool = False
    commitment_timeout_s: float = Field(default=600, gt=0)  # no report by then: failed, sent again

    @model_validator(mode="after")
    def _either_network_or_folder(self) -> Destination:
        network = (self.ae_title, self.host, self.port)
        if self.folder is not None:
            if any(v is not None for v in network):
                raise ValueError("a destination is either a folder or ae_title/host/port, not both")
            if self.storage_commitment:
                raise ValueError("storage_commitment needs a network destination (a folder commits nothing)")
        elif any(v is None for v in network):
            raise ValueError("a network destination needs ae_title, host and port (or give folder)")
        return self


class Profile(BaseModel):
    """How the images of a source are restored and where they go.

    Every key besides these is an option of the profile's restorer (gat-bm3d: `blend`; deep:
    `model`), passed to it as given; the restorer registry checks them
    (`dicom_node.pipeline.processing.check_profiles`), so a new option needs no change here.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    pipeline: str = Field(default="gat-bm3d", min_length=1)
    dose_fraction: float = Field(gt=0, le=1)
    destinations: list[str] = []
    forward_original: bool = False
    # a job whose QC figures are outside [qc.thresholds] is flagged either way; with hold_flagged it is
    # also held back from its destinations until someone releases it (`dicom-node release`, the dashboard)
    hold_flagged: bool = False
    # SOP Class UIDs this profile's sources may send that are not restored but forwarded unchanged to
    # its destinations (e.g. MG For Presentation, 1.2.840.10008.5.1.4.1.1.1.2): refused otherwise
    pass_through: list[Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)+$", max_length=64)]] = []

    @property
    def restorer_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Detector(_Strict):
    gain: float = Field(gt=0)  # λ, ADU
    electronic_noise: float = Field(ge=0)  # σ_e, standard deviation in ADU
    offset: float  # τ, ADU
    gain_map: Path | None = None  # optional per-pixel λ map (.npy), relative to the config file
    noise_kernel: Path | None = (
        None  # optional GAT-domain noise correlation kernel κ (.npy, odd sides, ‖κ‖₂ = 1); none: white
    )


class WorkerSettings(_Strict):
    count: int = Field(default=1, ge=0)  # worker processes `serve` supervises (0: run them elsewhere)
    lease_s: float = Field(default=300, gt=0)  # a claimed job returns to the queue if not renewed in time
    heartbeat_s: float = Field(default=30, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_attempts: int = Field(default=3, ge=1)  # an internal error or a killed worker: tried this often, then failed
    timeout_s: float = Field(default=900, gt=0)  # wall-clock limit of one image's restoration (the worker is killed)
    stop_grace_s: float = Field(default=60, gt=0)  # on stop, time to finish the job in hand before handing it back
    # images larger than this are refused before restoration (BM3D peaks at ~500 bytes per pixel)
    max_megapixels: float = Field(default=40, gt=0)


class RetryPolicy(_Strict):
    """dcm4chee's retry policy as data; `dicom_node.forward.retry` does the arithmetic."""

    initial_s: float = Field(default=30, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.1, ge=0, le=1)
    max_delay_s: float = Field(default=3600, gt=0)
    max_age_h: float = Field(default=72, gt=0)


class SelftestSettings(_Strict):
    """`dicom-node selftest` sends as calling_ae from loopback; the node restores the image with
    the built-in "selftest" profile and sends it to the selftest's own loopback receiver, never to PACS."""

    calling_ae: AeTitle = "DOSENODE-TEST"
    receiver_ae: AeTitle = "SELFTEST-RCV"
    receiver_port: int = Field(default=11113, ge=1, le=65535)
    dose_fraction: float = Field(default=0.5, gt=0, le=1)


class Threshold(_Strict):
    """The range a QC figure should stay in; a job outside it is flagged. No bound: not checked."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


DEFAULT_QC_THRESHOLDS: dict[str, Threshold] = {
    # docs/qc.md says what each figure measures and why these bounds
    "calibration_gain_ratio": Threshold(min=0.9, max=1.1),
    "noise_after": Threshold(max=1.3),
    "mean_ratio": Threshold(min=0.98, max=1.02),
    "method_noise_structure": Threshold(max=0.1),
    "saturated_fraction": Threshold(max=0.01),
    "clipped_fraction": Threshold(max=0.001),
    "breast_fraction": Threshold(min=0.02),
}


class QcSettings(_Strict):
    """Bounds of the per-image QC figures. A figure given here replaces its default bounds; an empty
    table ([qc.thresholds.mean_ratio]) turns its check off."""

    thresholds: dict[str, Threshold] = {}

    @property
    def effective_thresholds(self) -> dict[str, Threshold]:
        return {**DEFAULT_QC_THRESHOLDS, **self.thresholds}


class PhantomRule(_Strict):
    """Which received images are phantom QA images: every attribute given must match (exactly,
    surrounding spaces ignored). Matching images are restored and forwarded like any other, and also
    grouped, per rule and detector, into QA sessions that end after `quiet_minutes` without a new
    image; each session is then evaluated with the seed paper's protocol (`dicom_node.qa.phantom`)."""

    name: str = Field(min_length=1, max_length=64)
    patient_id: str | None = None
    station_name: str | None = None
    protocol_name: str | None = None
    quiet_minutes: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _matches_something(self) -> PhantomRule:
        if self.patient_id is None and self.station_name is None and self.protocol_name is None:
            raise ValueError("a phantom rule needs patient_id, station_name or protocol_name")
        return self


class DashboardUser(_Strict):
    role: Literal["qa", "admin"]  # qa: read only; admin: also retry, cancel, resend, reprocess, release
    password_hash: str  # made by `dicom-node hash-password`; never the password itself

    @field_validator("password_hash")
    @classmethod
    def _a_hash(cls, value: str) -> str:
        if not re.fullmatch(r"scrypt\$[0-9]+\$[0-9]+\$[0-9]+\$[A-Za-z0-9_-]+\$[A-Za-z0-9_-]+", value):
            raise ValueError("not a line from `dicom-node hash-password` (a password is never stored as it is)")
        return value


class DashboardSettings(_Strict):
    """The QA web dashboard `serve` runs on its own port (also /healthz and /metrics)."""

    enabled: bool = False
    bind: str = "127.0.0.1"  # localhost unless IT opens it on purpose
    port: int = Field(default=8080, ge=1, le=65535)
    session_minutes: float = Field(default=60, gt=0)  # a login expires after this long
    users: dict[str, DashboardUser] = {}

    @model_validator(mode="after")
    def _users_when_enabled(self) -> DashboardSettings:
        if self.enabled and not self.users:
            raise ValueError("an enabled dashboard needs at least one user ([dashboard.users.NAME])")
        return self


class SyslogSettings(_Strict):
    """The audit collector (an ATNA audit record repository, or any RFC 5424 syslog server)."""

    host: str = Field(min_length=1)
    protocol: Literal["udp", "tcp", "tls"] = "tls"  # ATNA asks for TLS (RFC 5425)
    port: int | None = Field(default=None, ge=1, le=65535)  # none: 6514 for tls, 514 otherwise
    ca: Path | None = None  # trusted CA of the collector's certificate (tls; none: the system's)
    timeout_s: float = Field(default=10, gt=0)

    @property
    def resolved_port(self) -> int:
        return self.port or (6514 if self.protocol == "tls" else 514)


class AuditSettings(_Strict):
    """The audit trail is always kept in the job log; `syslog` also sends it to a collector."""

    source_id: str = ""  # AuditSourceID in the messages; empty: the node's AE title
    syslog: SyslogSettings | None = None
    ship_every_s: float = Field(default=10, gt=0)  # how often unshipped lines go to the collector
    # the application log names images by UIDs and jobs by id; true adds Patient ID and name to the
    # receive lines, for debugging only (the log then holds patient data)
    log_patient_data: bool = False


SELFTEST_PROFILE = "selftest"
"""The built-in profile of images from the selftest (`dicom_node.tools.selftest` adds it)."""


class Config(_Strict):
    node: NodeSettings = NodeSettings()
    database: DatabaseSettings = DatabaseSettings()
    sources: list[Source] = []
    destinations: list[Destination] = []
    profiles: dict[str, Profile] = {}
    detectors: dict[str, Detector] = {}
    worker: WorkerSettings = WorkerSettings()
    selftest: SelftestSettings = SelftestSettings()
    retry: RetryPolicy = RetryPolicy()
    qc: QcSettings = QcSettings()
    phantom_qa: list[PhantomRule] = []
    dashboard: DashboardSettings = DashboardSettings()
    audit: AuditSettings = AuditSettings()
    path: Path | None = Field(default=None, exclude=True)  # the file it came from (None: embedded defaults)
    digest: str = Field(default="", exclude=True)  # SHA-256 of the file's text, for the audit trail

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        names = [d.name for d in self.destinations]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destination names must be unique: {', '.join(duplicated)}")
        for name, profile in self.profiles.items():
            for dest in profile.destinations:
                if dest not in names:
                    raise ValueError(f"profile {name!r} names unknown destination {dest!r}")
        for source in self.sources:
            if source.profile not in self.profiles:
                raise ValueError(f"source {source.ae_title!r} names unknown profile {source.profile!r}")
        rules = [rule.name for rule in self.phantom_qa]
        if len(set(rules)) != len(rules):
            raise ValueError("phantom_qa rule names must be unique")
        return self

    @property
    def base_dir(self) -> Path:
        """Relative paths in the file are relative to the file's folder (the embedded defaults' to the
        current folder, as the quickstart runs them from the checkout)."""
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir / path

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.node.data_dir)

    @property
    def model_dir(self) -> Path | None:
        return self.resolve(self.node.model_dir) if self.node.model_dir else None

    @property
    def database_url(self) -> str:
        """The job log's SQLAlchemy URL, a SQLite file's path made absolute like every other path."""
        from sqlalchemy.engine import make_url

        if not self.database.url:
            return f"sqlite:///{self.data_dir / 'joblog.sqlite'}"
        file = _sqlite_file(self.database.url)
        if file is None or file.is_absolute():
            return self.database.url
        return make_url(self.database.url).set(database=str(self.resolve(file))).render_as_string(hide_password=False)

    @property
    def joblog_file(self) -> Path | None:
        """The job log's SQLite file (None: another database)."""
        return _sqlite_file(self.database_url)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database, or SQLite in memory."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return None if parsed.database.startswith("file:") else Path(parsed.database)


def describe_validation_error(error: ValidationError) -> str:
    """All problems of a ValidationError as one line, each naming its key."""
    parts = []
    for item in error.errors():
        key = ""
        for part in item["loc"]:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif (
            "input" in item
            and item["type"] not in ("missing",)
            and not isinstance(item["input"], dict)
            and item["loc"][-1] != "password_hash"  # it may be a password pasted by mistake: never echoed
        ):
            message = f"{message} (got {item['input']!r})"
        parts.append(f"{key}: {message}" if key else message)
    return "; ".join(parts)


def parse_config(data: dict, path: Path | None = None, digest: str = "") -> Config:
    """`data` validated; `path` is the file it came from, whose folder relative paths start from,
    `digest` the SHA-256 of its text."""
    where = str(path) if path else "embedded defaults"
    for own in ("path", "digest"):  # the loader's own fields, not keys of the file
        if own in data:
            raise ConfigurationError(f"{where}: {own}: unknown key")
    try:
        return Config.model_validate({**data, "path": path, "digest": digest})
    except ValidationError as exc:
        raise ConfigurationError(f"{where}: {describe_validation_error(exc)}") from None


def default_config_text() -> str:
    return resources.files("dicom_node").joinpath("defaults/node.toml").read_text()


def load_config(path: str | Path | None = None) -> Config:
    """Load FILE, else $DICOM_NODE_CONFIG, else the embedded defaults."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    if path is None:
        text = default_config_text()
        return parse_config(tomllib.loads(text), digest=hashlib.sha256(text.encode()).hexdigest())
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path.resolve(), hashlib.sha256(text.encode()).hexdigest())
