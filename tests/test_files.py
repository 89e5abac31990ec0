"""The one atomic writer (fedcli.files): whole new file or untouched old one, never a temp file left."""

import os
import stat

import pytest

from fedcli.files import atomic_write_at, atomic_writer, write_atomic


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new contents", ".state-")
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # as mkstemp made it: local state is private
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_stream_keeps_the_old_file(tmp_path):
    target = tmp_path / "bundle.tar"
    target.write_bytes(b"old bundle")
    with pytest.raises(RuntimeError), atomic_writer(target, ".bundle-") as f:
        f.write(b"half a bund")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar"]


def test_create_only_refuses_an_existing_name_and_replaces_a_planted_link_itself(tmp_path):
    (tmp_path / "taken").write_bytes(b"first")
    secret = tmp_path / "secret"
    secret.write_bytes(b"private")
    (tmp_path / "link").symlink_to(secret)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError), atomic_write_at(fd, "taken", ".tmp-", create_only=True) as f:
            f.write(b"second")
        with atomic_write_at(fd, "link", ".tmp-") as f:
            f.write(b"written")
    finally:
        os.close(fd)
    assert (tmp_path / "taken").read_bytes() == b"first"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link").read_bytes() == b"written"
    assert secret.read_bytes() == b"private"  # rename replaces the link, never writes through it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "secret", "taken"]
