"""The one configuration loader: TOML validated by pydantic.

Every part of the node (serve, worker, process, calibrate, phantom) reads its settings through
`load_config`. A wrong key or value becomes a `ConfigError` whose text is one line naming the key,
so radiology IT can fix the file without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import random
import tomllib
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.restore.noise import NoiseModel

CONFIG_ENV = "DICOM_NODE_CONFIG"
"""Environment variable naming the configuration file when --config is not given."""

AeTitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]


class ConfigError(Exception):
    """A configuration problem, worded as one line for a person."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Strict):
    ae_title: AeTitle = "DOSENODE"
    port: int = Field(11112, ge=1, le=65535)
    bind: str = "0.0.0.0"
    data_dir: Path = Path("data")
    max_associations: int = Field(10, ge=1)
    acse_timeout_s: float = Field(30, gt=0)  # association negotiation
    dimse_timeout_s: float = Field(60, gt=0)  # waiting for a DIMSE message
    network_timeout_s: float = Field(60, gt=0)  # an idle association is closed after this
    min_free_disk_mb: float = Field(1024, ge=0)  # below this, new associations are refused
    duplicate_policy: Literal["ignore-identical", "reprocess-all"] = "ignore-identical"
    retention_days: float = Field(7, ge=0)  # files of finished jobs are kept this long
    model_dir: Path | None = None  # trained models for the "deep" pipeline (default: the shipped ones)

    @field_validator("ae_title")
    @classmethod
    def _no_backslash(cls, value: str) -> str:
        if "\\" in value:
            raise ValueError("an AE title may not contain a backslash")
        return value.strip()


class DatabaseSettings(_Strict):
    url: str = ""  # empty: SQLite file in data_dir


class Source(_Strict):
    ae_title: AeTitle
    hosts: list[str] = []  # CIDRs or addresses; empty: any host
    profile: str

    @field_validator("hosts")
    @classmethod
    def _valid_networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or CIDR network") from None
        return hosts


class Destination(_Strict):
    name: str = Field(min_length=1)
    ae_title: AeTitle | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    folder: Path | None = None
    timeout_s: float = Field(120, gt=0)  # watchdog: the longest one send may take

    @model_validator(mode="after")
    def _either_network_or_folder(self) -> "Destination":
        network = (self.ae_title, self.host, self.port)
        if self.folder is not None:
            if any(v is not None for v in network):
                raise ValueError("a destination is either a folder or ae_title/host/port, not both")
        elif any(v is None for v in network):
            raise ValueError("a network destination needs ae_title, host and port (or give folder)")
        return self


class Profile(_Strict):
    pipeline: Literal["gat-bm3d", "deep"] = "gat-bm3d"
    model: str = ""
    blend: Literal["plain", "noise-aware"] = "plain"  # gat-bm3d: see GatBm3dRestorer
    dose_fraction: float = Field(gt=0, le=1)
    destinations: list[str] = []
    forward_original: bool = False


class Detector(_Strict):
    gain: float = Field(gt=0)  # λ, ADU
    electronic_noise: float = Field(ge=0)  # σ_e, standard deviation in ADU
    offset: float  # τ, ADU
    gain_map: Path | None = None  # optional per-pixel λ map (.npy), relative to the config file


class WorkerSettings(_Strict):
    count: int = Field(1, ge=0)  # worker processes `serve` supervises (0: run them elsewhere)
    lease_s: float = Field(300, gt=0)  # a claimed job returns to the queue if not renewed in time
    heartbeat_s: float = Field(30, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RetryPolicy(_Strict):
    initial_s: float = Field(30, gt=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.1, ge=0, le=1)
    max_delay_s: float = Field(3600, gt=0)
    max_age_h: float = Field(72, gt=0)

    def retry_at(self, attempt: int, first_seen: datetime, now: datetime) -> datetime | None:
        """When to try again after failed attempt number `attempt` (1, 2, …); None: give up.

        The delay grows geometrically up to max_delay_s, spread by ±jitter so that a PACS coming
        back is not hit by every waiting image at once; past max_age_h the failure is final.
        """
        delay = min(self.initial_s * self.multiplier ** max(attempt - 1, 0), self.max_delay_s)
        delay *= 1 + self.jitter * random.uniform(-1, 1)
        when = now + timedelta(seconds=delay)
        if when - first_seen > timedelta(hours=self.max_age_h):
            return None
        return when


class SelftestSettings(_Strict):
    """`dicom-node selftest` sends as calling_ae from loopback; the node restores the image with
    the built-in "selftest" profile and sends it to the selftest's own loopback receiver, never to PACS."""

    calling_ae: AeTitle = "DOSENODE-TEST"
    receiver_ae: AeTitle = "SELFTEST-RCV"
    receiver_port: int = Field(11113, ge=1, le=65535)
    dose_fraction: float = Field(0.5, gt=0, le=1)


SELFTEST_PROFILE = "selftest"
SELFTEST_DESTINATION = "selftest-receiver"


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
    path: Path | None = Field(None, exclude=True)  # the file it came from (None: embedded defaults)

    @model_validator(mode="after")
    def _references_resolve(self) -> "Config":
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
        return self

    def with_selftest(self) -> "Config":
        """This configuration plus the selftest's profile and loopback destination (for `serve`)."""
        if SELFTEST_PROFILE in self.profiles:
            return self
        receiver = Destination(
            name=SELFTEST_DESTINATION, ae_title=self.selftest.receiver_ae, host="127.0.0.1",
            port=self.selftest.receiver_port, timeout_s=30,
        )
        profile = Profile(pipeline="gat-bm3d", dose_fraction=self.selftest.dose_fraction, destinations=[receiver.name])
        return self.model_copy(
            update={
                "destinations": [*self.destinations, receiver],
                "profiles": {**self.profiles, SELFTEST_PROFILE: profile},
            }
        )

    @property
    def base_dir(self) -> Path:
        """Relative paths in the file are relative to the file's folder (cwd for defaults)."""
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
        return self.database.url or f"sqlite:///{self.data_dir / 'joblog.sqlite'}"

    def detector_for(self, serial: str | None) -> tuple[str, Detector] | None:
        """The detector entry for a Device Serial Number, else the `default` entry, else None."""
        if serial and serial in self.detectors:
            return serial, self.detectors[serial]
        if "default" in self.detectors:
            return "default", self.detectors["default"]
        return None

    def noise_model(self, name: str, shape: tuple[int, int] | None = None) -> NoiseModel:
        """The NoiseModel of detector entry `name`, loading its gain map when it has one."""
        detector = self.detectors[name]
        gain: float | np.ndarray = detector.gain
        if detector.gain_map is not None:
            path = self.resolve(detector.gain_map)
            try:
                gain = np.load(path)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"detectors.{name}.gain_map: cannot read {path}: {exc}") from None
            if shape is not None and gain.shape != tuple(shape):
                raise ConfigError(
                    f"detectors.{name}.gain_map: map is {gain.shape[0]}×{gain.shape[1]} "
                    f"but the image is {shape[0]}×{shape[1]}"
                )
        return NoiseModel(gain, detector.electronic_noise, detector.offset)


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
        elif "input" in item and item["type"] not in ("missing",) and not isinstance(item["input"], dict):
            message = f"{message} (got {item['input']!r})"
        parts.append(f"{key}: {message}" if key else message)
    return "; ".join(parts)


def parse_config(data: dict, path: Path | None = None) -> Config:
    try:
        return Config.model_validate({**data, "path": path})
    except ValidationError as exc:
        where = str(path) if path else "embedded defaults"
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


def default_config_text() -> str:
    return resources.files("dicom_node").joinpath("defaults/node.toml").read_text()


def load_config(path: str | Path | None = None) -> Config:
    """Load FILE, else $DICOM_NODE_CONFIG, else the embedded defaults."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    if path is None:
        return parse_config(tomllib.loads(default_config_text()))
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path.resolve())
