"""`check-config` catches what would fail before the node runs, and `serve` on a busy port is one line."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.restore.deep.store import SHIPPED_MODEL_DIR

from peers import free_port

NODE_BIN = str(Path(sys.executable).with_name("dicom-node"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def site_config(
    folder: Path,
    extra: str = "",
    *,
    port: int | None = None,
    bind: str = "127.0.0.1",
    data_dir: str = "data",
    sources: bool = True,
    node: str = "",
) -> Path:
    """A configuration under `folder`: one profile, one folder destination, one source unless told not."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    source = '[[sources]]\nae_title = "MAMMO1"\nprofile = "half-dose"\n' if sources else ""
    path.write_text(f"""
[node]
port = {port or free_port()}
bind = "{bind}"
data_dir = "{data_dir}"
{node}

{source}
[[destinations]]
name = "outbox"
folder = "outbox"

[profiles.half-dose]
dose_fraction = 0.5
destinations = ["outbox"]
{extra}
""")
    return path


def check(capsys, path: Path) -> tuple[int, str, str]:
    code, out, err = run(capsys, "check-config", "--no-echo", "--config", str(path))
    print(out, err)
    return code, out, err


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def assert_fails_naming(code: int, err: str, key: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    [line] = [line for line in errors(err) if line.startswith(f"error: {key}")]
    for fragment in fragments:
        assert fragment in line


def test_a_good_configuration_is_valid_and_names_its_job_log(capsys, tmp_path):
    path = site_config(tmp_path / "site")
    code, out, err = check(capsys, path)
    assert code == 0, err
    assert err == ""
    assert f"job log: {tmp_path / 'site' / 'data' / 'joblog.sqlite'}" in out
    assert f"{path}: valid" in out


def test_a_database_url_is_named_with_its_password_masked(capsys, tmp_path):
    path = site_config(tmp_path, "[database]\nurl = 'postgresql+psycopg://node:s3cret@db.example/dicomnode'\n")
    _, out, err = check(capsys, path)
    assert "job log: postgresql+psycopg://node:***@db.example/dicomnode" in out
    assert "s3cret" not in out + err


def test_a_missing_model_fails(capsys, tmp_path):
    path = site_config(tmp_path, "[profiles.deep]\npipeline = 'deep'\ndose_fraction = 0.5\nmodel = 'nonexistent'\n")
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "profiles.deep", "nonexistent")


def test_a_missing_denoising_model_fails(capsys, tmp_path):
    path = site_config(tmp_path, "[profiles.net]\ndose_fraction = 0.5\ndenoiser = 'network'\nmodel = 'absent'\n")
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "profiles.net", "absent")


def test_a_model_whose_weights_do_not_match_its_card_fails(capsys, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(SHIPPED_MODEL_DIR / f"hresnet-phantom-50{suffix}", models)
    with open(models / "hresnet-phantom-50.safetensors", "ab") as weights:
        weights.write(b"\0")  # one byte more: another digest
    path = site_config(
        tmp_path,
        "[profiles.deep]\npipeline = 'deep'\ndose_fraction = 0.5\nmodel = 'hresnet-phantom-50'\n",
        node='model_dir = "models"',
    )
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "profiles.deep", "hresnet-phantom-50", "do not match its card")


def test_no_default_model_for_the_profiles_dose_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DICOM_NODE_MODEL_DIR", raising=False)
    path = site_config(tmp_path, "[profiles.deep]\npipeline = 'deep'\ndose_fraction = 0.3\n")
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "profiles.deep", "no default model for dose fraction 0.3")


def test_a_named_model_made_for_another_dose_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DICOM_NODE_MODEL_DIR", raising=False)
    path = site_config(
        tmp_path, "[profiles.deep]\npipeline = 'deep'\ndose_fraction = 0.25\nmodel = 'hresnet-phantom-50'\n"
    )
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "profiles.deep", "hresnet-phantom-50", "0.25")


def test_the_default_deep_model_for_the_dose_passes(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DICOM_NODE_MODEL_DIR", raising=False)
    path = site_config(tmp_path, "[profiles.deep]\npipeline = 'deep'\ndose_fraction = 0.25\n")
    code, _, err = check(capsys, path)
    assert code == 0, err


def test_a_data_dir_that_is_a_file_fails(capsys, tmp_path):
    (tmp_path / "data").write_text("not a folder")
    code, _, err = check(capsys, site_config(tmp_path))
    assert_fails_naming(code, err, "node.data_dir", "not a folder")


def test_a_data_dir_below_a_file_fails(capsys, tmp_path):
    (tmp_path / "blocker").write_text("not a folder")
    code, _, err = check(capsys, site_config(tmp_path, data_dir="blocker/data"))
    assert_fails_naming(code, err, "node.data_dir", "blocker")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_a_read_only_data_dir_fails(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data").chmod(0o555)
    try:
        code, _, err = check(capsys, site_config(tmp_path))
    finally:
        (tmp_path / "data").chmod(0o755)
    assert_fails_naming(code, err, "node.data_dir", "cannot write")


def test_a_node_port_equal_to_the_selftest_receivers_fails(capsys, tmp_path):
    port = free_port()
    path = site_config(tmp_path, f"[selftest]\nreceiver_port = {port}\n", port=port)
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "node.port", str(port), "selftest.receiver_port")


def test_a_destination_that_is_the_node_itself_fails(capsys, tmp_path):
    port = free_port()
    path = site_config(
        tmp_path,
        f"[[destinations]]\nname = 'loop'\nae_title = 'DOSENODE'\nhost = '127.0.0.1'\nport = {port}\n",
        port=port,
    )
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "destinations[1] (loop)", "this node itself")


def test_a_port_another_program_holds_is_a_warning(capsys, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        code, out, err = check(capsys, site_config(tmp_path, port=holder.getsockname()[1]))
    assert code == 0, err
    assert "warning: node.port: cannot listen on 127.0.0.1:" in err and "address already in use" in err
    assert "valid" in out


@pytest.mark.parametrize(
    "content, fragment",
    [
        pytest.param(b"not numpy", "not a .npy array file", id="not-npy"),
        pytest.param(None, "cannot read", id="missing"),
    ],
)
def test_a_gain_map_that_does_not_load_fails(capsys, tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "gain.npy").write_bytes(content)
    path = site_config(
        tmp_path, "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\ngain_map = 'gain.npy'\n"
    )
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "detectors.SN1.gain_map", str(tmp_path / "gain.npy"), fragment)


def test_a_noise_kernel_that_breaks_the_rules_fails(capsys, tmp_path):
    np.save(tmp_path / "kernel.npy", np.ones((2, 2)))  # even sides
    path = site_config(
        tmp_path, "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\nnoise_kernel = 'kernel.npy'\n"
    )
    code, _, err = check(capsys, path)
    assert_fails_naming(code, err, "detectors.SN1.noise_kernel", "kernel.npy")


def test_every_problem_is_one_line_and_all_are_listed(capsys, tmp_path):
    (tmp_path / "data").write_text("not a folder")
    path = site_config(
        tmp_path,
        "[profiles.deep]\npipeline = 'deep'\ndose_fraction = 0.5\nmodel = 'nonexistent'\n"
        "[detectors.SN1]\ngain = 0.1\nelectronic_noise = 3\noffset = 50\ngain_map = 'absent.npy'\n",
    )
    code, _, err = check(capsys, path)
    assert code == 2
    keys = [line.split(":")[1].strip() for line in errors(err)]
    assert keys == ["node.data_dir", "profiles.deep", "detectors.SN1.gain_map"]
    assert err.strip().splitlines()[-1] == f"dicom-node: error: {path}: not valid (3 problems above)"


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_an_open_door_on_all_addresses_is_a_warning(capsys, tmp_path, bind):
    if bind == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    code, out, err = check(capsys, site_config(tmp_path, bind=bind, sources=False))
    assert code == 0, err
    [warning] = err.strip().splitlines()
    assert warning.startswith("warning: no [[sources]] configured: accepting any calling AE, profile 'half-dose'")
    assert f"{bind}:" in warning
    assert "valid" in out


def test_no_open_door_warning_on_loopback_or_with_sources(capsys, tmp_path):
    assert check(capsys, site_config(tmp_path / "with-sources", bind="0.0.0.0"))[2] == ""
    assert check(capsys, site_config(tmp_path / "loopback", sources=False))[2] == ""


def test_serve_on_a_busy_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = site_config(tmp_path, "[worker]\ncount = 0\n", port=port)
        result = subprocess.run(
            [NODE_BIN, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
    print(result.stderr)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"dicom-node: error: cannot listen on 127.0.0.1:{port}: address already in use (another program, or a running node)"
    )
