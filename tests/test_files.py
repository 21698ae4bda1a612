"""write_atomically: the target appears whole or not at all, and the rename is made durable."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from dicom_node import files
from dicom_node.files import fsync_directory, write_atomically


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_bytes_are_written_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "out.dcm"
    assert write_atomically(target, b"whole image") == target
    assert target.read_bytes() == b"whole image"
    assert names(tmp_path) == ["out.dcm"], "no temporary file left behind"


def test_a_writer_function_gets_a_binary_stream(tmp_path: Path) -> None:
    def writer(stream: BinaryIO) -> None:
        stream.write(b"part one, ")
        stream.write(b"part two")

    write_atomically(tmp_path / "out.bin", writer)
    assert (tmp_path / "out.bin").read_bytes() == b"part one, part two"


def test_accepts_str_paths_and_buffers(tmp_path: Path) -> None:
    write_atomically(str(tmp_path / "out.bin"), memoryview(b"abc"), temp_dir=str(tmp_path))
    assert (tmp_path / "out.bin").read_bytes() == b"abc"


def test_replace_swaps_in_the_new_content(tmp_path: Path) -> None:
    target = tmp_path / "out.dcm"
    target.write_bytes(b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["out.dcm"]


def test_a_writer_that_raises_leaves_no_target_and_no_temporary_file(tmp_path: Path) -> None:
    def half_then_fail(stream: BinaryIO) -> None:
        stream.write(b"half an ima")
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_atomically(tmp_path / "out.dcm", half_then_fail)
    assert names(tmp_path) == []


def test_a_writer_that_raises_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.dcm"
    target.write_bytes(b"old")

    def fail(stream: BinaryIO) -> None:
        stream.write(b"new but broken")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["out.dcm"]


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_atomically(tmp_path / "out.dcm", b"data")
    assert names(tmp_path) == []


def test_no_replace_raises_and_keeps_the_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.dcm"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_atomically(target, b"second", replace=False)
    assert target.read_bytes() == b"first"
    assert names(tmp_path) == ["out.dcm"]


def test_no_replace_claims_a_free_name(tmp_path: Path) -> None:
    target = tmp_path / "out.dcm"
    write_atomically(target, b"first", replace=False)
    assert target.read_bytes() == b"first"
    assert target.stat().st_nlink == 1, "the temporary link is gone"
    assert names(tmp_path) == ["out.dcm"]


def test_temp_dir_holds_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging, final = tmp_path / "incoming", tmp_path / "study"
    staging.mkdir()
    final.mkdir()
    seen: list[str] = []

    def writer(stream: BinaryIO) -> None:
        seen.extend(names(staging))
        stream.write(b"data")

    write_atomically(final / "a.dcm", writer, replace=False, temp_dir=staging)
    assert len(seen) == 1 and seen[0].startswith(".a.dcm.") and seen[0].endswith(".part")
    assert names(staging) == [] and names(final) == ["a.dcm"]

    (final / "b.dcm").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_atomically(final / "b.dcm", b"new", replace=False, temp_dir=staging)
    assert names(staging) == [] and (final / "b.dcm").read_bytes() == b"old"


def test_default_permissions_are_owner_only(tmp_path: Path) -> None:
    write_atomically(tmp_path / "out.dcm", b"data")
    assert stat.S_IMODE((tmp_path / "out.dcm").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o400])
def test_mode_is_applied(tmp_path: Path, mode: int) -> None:
    write_atomically(tmp_path / "out.dcm", b"data", mode=mode)
    assert stat.S_IMODE((tmp_path / "out.dcm").stat().st_mode) == mode
    write_atomically(tmp_path / "linked.dcm", b"data", replace=False, mode=mode)
    assert stat.S_IMODE((tmp_path / "linked.dcm").stat().st_mode) == mode


def test_a_long_name_still_gets_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 250 + ".dcm")
    write_atomically(target, b"data")
    assert names(tmp_path) == [target.name]


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Record each fsync as (path of the descriptor, whether it is a directory)."""
    calls: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return calls


def test_file_then_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_fsyncs(monkeypatch)
    write_atomically(tmp_path / "out.dcm", b"data")
    assert len(calls) == 2
    (file_path, file_is_dir), (dir_path, dir_is_dir) = calls
    assert not file_is_dir and Path(file_path).parent == tmp_path, "the temporary file's content"
    assert dir_is_dir and Path(dir_path) == tmp_path, "the rename"


def test_the_target_folder_is_fsynced_not_the_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging, final = tmp_path / "incoming", tmp_path / "study"
    staging.mkdir()
    final.mkdir()
    calls = count_fsyncs(monkeypatch)
    write_atomically(final / "a.dcm", b"data", replace=False, temp_dir=staging)
    assert [Path(path) for path, is_dir in calls if is_dir] == [final]


def test_nothing_is_fsynced_as_done_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out.dcm").write_bytes(b"old")
    calls = count_fsyncs(monkeypatch)
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "out.dcm", b"new", replace=False)
    assert [is_dir for _, is_dir in calls] == [False]


def test_fsync_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_fsyncs(monkeypatch)
    fsync_directory(tmp_path)
    fsync_directory(str(tmp_path))
    assert calls == [(str(tmp_path), True)] * 2


# The spool claims names with replace=False


def test_spool_writes_once_per_store_and_numbers_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.receive import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    calls = count_fsyncs(monkeypatch)
    paths = [spool.store(b"same bytes", "1.2.3", "1.2.3.4", "ab" * 32) for _ in range(3)]
    assert [p.name for p in paths] == [
        "1.2.3.4-abababababab.dcm",
        "1.2.3.4-abababababab-2.dcm",
        "1.2.3.4-abababababab-3.dcm",
    ]
    assert all(p.read_bytes() == b"same bytes" for p in paths)
    assert sum(not is_dir for _, is_dir in calls) == 3, "the data is written (and fsynced) once per store"
    assert names(spool.incoming) == []


def test_spool_takes_the_next_name_when_another_store_wins_the_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.receive import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    real_link = os.link

    def link_after_a_rival(source, target, **kwargs):
        if Path(target).name.endswith("-abababababab.dcm"):  # a rival claims the name first
            Path(target).write_bytes(b"rival")
        real_link(source, target, **kwargs)

    monkeypatch.setattr(files.os, "link", link_after_a_rival)
    path = spool.store(b"mine", "1.2.3", "1.2.3.4", "ab" * 32)
    assert path.name == "1.2.3.4-abababababab-2.dcm" and path.read_bytes() == b"mine"
    assert (path.parent / "1.2.3.4-abababababab.dcm").read_bytes() == b"rival"
    assert names(spool.incoming) == []


def test_spool_start_removes_what_an_interrupted_store_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between writing and linking leaves the helper's temporary file; prepare() removes it."""
    from dicom_node.receive import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()

    def crash(*args, **kwargs):
        raise SystemExit("power cut")

    monkeypatch.setattr(files.os, "link", crash)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # the process dies: no cleanup
    with pytest.raises(SystemExit):
        spool.store(b"half", "1.2.3", "1.2.3.4", "ab" * 32)
    monkeypatch.undo()
    leftovers = names(spool.incoming)
    assert len(leftovers) == 1 and leftovers[0].endswith(".part")
    assert spool.prepare() == 1 and names(spool.incoming) == []


# Files handed to others: `[node] file_mode` (default 0640, the node's group reads them)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def file_mode_config(tmp_path: Path, file_mode: str | None):
    from dicom_node.config import load_config

    path = tmp_path / "node.toml"
    mode = f'file_mode = "{file_mode}"' if file_mode else ""
    path.write_text(
        f'[node]\ndata_dir = "data"\n{mode}\n[[destinations]]\nname = "outbox"\nfolder = "outbox"\n'
        '[profiles.p]\ndose_fraction = 0.5\ndestinations = ["outbox"]\n'
    )
    return load_config(path)


@pytest.mark.parametrize(("file_mode", "expected"), [(None, 0o640), ("0600", 0o600), ("0644", 0o644)])
def test_spooled_and_outbox_files_get_the_configured_mode(tmp_path: Path, file_mode: str | None, expected: int) -> None:
    """Through what the running node builds from its configuration: the receiver's spool, the dispatcher's outbox."""
    from dicom_node.forward.dispatch import Dispatcher
    from dicom_node.imaging import raw_mammogram_dataset, save_dataset
    from dicom_node.joblog import JobLog
    from dicom_node.receive.scp import StorageSCP

    config = file_mode_config(tmp_path, file_mode)
    joblog = JobLog(config.database_url)
    spool = StorageSCP(config, joblog).spool
    spool.prepare()
    spooled = spool.store(b"received bytes", "1.2.3", "1.2.3.4", "ab" * 32)
    assert mode_of(spooled) == expected
    derived = tmp_path / "derived.dcm"
    save_dataset(raw_mammogram_dataset(np.full((64, 48), 500, np.uint16), seed=1), derived)
    result = Dispatcher(config, joblog).destinations["outbox"].send(derived)
    assert result.ok, result
    [sent] = (tmp_path / "outbox").iterdir()
    assert mode_of(sent) == expected
    joblog.close()
