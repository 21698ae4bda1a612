"""Whether this machine can run a configuration: what `check-config` looks at beyond the schema.

The schema (`dicom_node.config`) knows what each value may be; these checks look at what the
values name — models, folders, ports, calibration files, the job log — so that a mistake shows
when IT checks the file, not when the first image fails. Each problem is one line that starts
with the key to fix; a warning is said but does not make the configuration invalid.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Config, Profile
from dicom_node.errors import ConfigurationError, NodeError, Unavailable

LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


@dataclass(frozen=True)
class Problem:
    """One line naming the key to fix; a warning does not fail the check."""

    text: str
    warning: bool = False


def check_configuration(config: Config) -> list[Problem]:
    """Everything `check-config` finds wrong with `config` on this machine, in the file's order."""
    problems = [
        *_data_dir_problems(config),
        *_listen_problems(config),
        *_database_problems(config),
        *_source_problems(config),
        *_destination_problems(config),
    ]
    for name, profile in config.profiles.items():
        problems.extend(_profile_problems(config, name, profile))
    problems.extend(_detector_problems(config))
    return problems


def check_listen(bind: str, port: int) -> None:
    """Bind `bind`:`port` the way the Storage SCP does (SO_REUSEADDR) and let go at once.

    A port that another program holds now raises `Unavailable` (it may be free later); an address
    this host does not have, or a port it may not open, raises `ConfigurationError`.
    """
    where = f"{bind}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"node.bind: cannot listen on {where}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            if exc.errno == errno.EADDRINUSE:
                raise Unavailable(f"cannot listen on {where}: {reason} (another program, or a running node)") from None
            key = "node.port" if exc.errno == errno.EACCES else "node.bind"
            raise ConfigurationError(f"{key}: cannot listen on {where}: {reason}") from None


def existing_joblog_url(config: Config) -> str:
    """The job log's URL for a command that reads or amends it; a SQLite file that is not there is
    refused rather than created empty (a relative data_dir read from the wrong folder shows a log
    with no jobs, which looks like the truth)."""
    path = config.joblog_file
    if path is not None and not path.is_file():
        where = str(config.path) if config.path else "the embedded defaults (data_dir relative to the current folder)"
        raise ConfigurationError(
            f"no job log at {path}: the node has not run with {where}; "
            "run the command where `dicom-node serve` runs, or pass its --config"
        )
    return config.database_url


def _data_dir_problems(config: Config) -> list[Problem]:
    problem = _unwritable(config.data_dir)
    return [Problem(f"node.data_dir: {problem}")] if problem else []


def _unwritable(folder: Path) -> str | None:
    """Why the node could not write in `folder`, or None: a probe file is made and removed there
    (in its nearest existing parent when it is missing, since the node creates it)."""
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a folder" + ("" if existing == folder else f", so {folder} cannot be made")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing}: {(exc.strerror or str(exc)).lower()}"
    return None


def _listen_problems(config: Config) -> list[Problem]:
    """The node's port: not one the selftest's receiver uses (it listens on loopback while the node
    runs), not one another program holds now (a warning: it may be a running node), and one this
    host lets it open."""
    node = config.node
    if node.port == config.selftest.receiver_port:
        return [
            Problem(
                f"node.port: {node.port} is also selftest.receiver_port, where `dicom-node selftest` listens "
                "for the node's answer; give one of them another port"
            )
        ]
    try:
        check_listen(node.bind, node.port)
    except Unavailable as exc:
        return [Problem(f"node.port: {exc}; `serve` fails until it is free", warning=True)]
    except ConfigurationError as exc:
        return [Problem(str(exc))]
    return []


def _database_problems(config: Config) -> list[Problem]:
    """The job log's URL parses and its driver is installed; a SQLite file outside data_dir can be written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    key = "database.url"
    try:
        make_url(config.database_url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as exc:
        return [Problem(f"{key}: {exc}")]
    except ImportError as exc:
        return [Problem(f"{key}: the database driver is not installed ({exc})")]
    path = config.joblog_file
    if path is None or path.parent == config.data_dir:
        return []
    problem = _unwritable(path.parent)
    return [Problem(f"{key}: {problem}")] if problem else []


def _source_problems(config: Config) -> list[Problem]:
    """No profile to give images to is an error; an open door (no [[sources]]) on an address other
    hosts reach is a warning, as `serve` logs it."""
    from dicom_node.receive.allowlist import AllowList

    try:
        allowlist = AllowList(config)
    except ConfigurationError as exc:
        return [Problem(f"profiles: {exc}")]
    if not allowlist.is_open or _is_loopback(config.node.bind):
        return []
    return [
        Problem(
            f"no [[sources]] configured: accepting any calling AE, profile {allowlist.default_profile!r}, from any "
            f"host that reaches {config.node.bind}:{config.node.port}; name the modalities in [[sources]] to close it",
            warning=True,
        )
    ]


def _destination_problems(config: Config) -> list[Problem]:
    """A destination that is this node itself would feed restored images back in."""
    return [
        Problem(
            f"destinations[{index}] ({entry.name}): {entry.host}:{entry.port} is this node itself; "
            "restored images would come back to be restored again"
        )
        for index, entry in enumerate(config.destinations)
        if entry.host is not None and _is_loopback(entry.host) and entry.port == config.node.port
    ]


def _profile_problems(config: Config, name: str, profile: Profile) -> list[Problem]:
    """The profile's restorer built as a worker builds it (options checked, named models loaded and
    their digests checked) and, for the deep pipeline, the model its dose fraction will get. Nothing
    is restored: a trial restoration costs seconds per profile (BM3D)."""
    from dicom_node.pipeline.processing import environment_of
    from dicom_node.restore.registry import create_restorer

    key = f"profiles.{name}"
    options = profile.restorer_options
    try:
        create_restorer(profile.pipeline, environment_of(config), **options)
        if profile.pipeline == "deep":  # it picks its model per image, by dose: check the one this dose gets
            _check_deep_model(config, str(options.get("model") or ""), profile.dose_fraction)
    except NodeError as exc:
        return [Problem(f"{key}: {exc}")]
    except Exception as exc:  # a library that is missing or broken: the profile would fail every image
        return [Problem(f"{key}: cannot build restorer {profile.pipeline!r}: {type(exc).__name__}: {exc}")]
    return []


def _check_deep_model(config: Config, model: str, dose_fraction: float) -> None:
    from dicom_node.restore.deep.card import TASKS
    from dicom_node.restore.deep.store import cached_model, default_model_dir, resolve_model, serves

    model_dir = config.model_dir or default_model_dir()
    name = resolve_model(model_dir, model or None, dose_fraction, TASKS)
    _, card = cached_model(model_dir, name, "cpu")  # its weights checked against the card
    if not serves(card, dose_fraction):
        trained = "/".join(f"{dose:g}" for dose in card.dose_fractions)
        raise ConfigurationError(
            f"model {name!r} was trained for dose fraction {trained}, not the profile's {dose_fraction:g}"
        )


def _detector_problems(config: Config) -> list[Problem]:
    """Each entry's gain map and noise kernel load and fit the noise model's rules."""
    from dicom_node.detectors import detector_noise

    problems = []
    for name in config.detectors:
        try:
            detector_noise(config, name)
        except ConfigurationError as exc:
            text = str(exc)
            problems.append(Problem(text if text.startswith(f"detectors.{name}") else f"detectors.{name}: {text}"))
    return problems


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
