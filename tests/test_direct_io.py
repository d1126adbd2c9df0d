"""Whole-file reads into aligned buffers: same bytes with and without O_DIRECT, sizes checked first."""
from __future__ import annotations

import errno
import os

import pytest

from model.direct_io import ALIGN, WholeFileReader, align_up, aligned_bytes


def _file(tmp_path, size=3 * ALIGN + 123):
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


def test_a_whole_file_lands_in_an_aligned_buffer(tmp_path):
    path, data = _file(tmp_path)
    image = aligned_bytes(align_up(len(data)))
    assert image.data_ptr() % ALIGN == 0
    assert WholeFileReader().read(path, len(data), image) == len(data)
    assert bytes(image[:len(data)].numpy()) == data


def test_a_file_of_another_size_is_not_read(tmp_path):
    path, data = _file(tmp_path)
    image = aligned_bytes(align_up(len(data)))
    image.zero_()
    assert WholeFileReader().read(path, len(data) + 1, image) == len(data)
    assert int(image.sum()) == 0


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        WholeFileReader().read(tmp_path / "absent", 10, aligned_bytes(ALIGN))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux")
def test_a_file_system_refusing_o_direct_at_read_time_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse it at read with EINVAL (not
    reproducible on this disk, so preadv refuses the first flagged read here)."""
    path, data = _file(tmp_path)
    probe = WholeFileReader()
    probe.read(path, len(data), aligned_bytes(align_up(len(data))))
    if not probe.direct:
        pytest.skip(f"the file system under {tmp_path} refuses O_DIRECT at open")
    reader = WholeFileReader()
    reader.direct = True
    real_preadv, refused = os.preadv, []

    def preadv(fd, buffers, offset):
        if fcntl_flags(fd) & os.O_DIRECT and not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    image = aligned_bytes(align_up(len(data)))
    assert reader.read(path, len(data), image) == len(data)
    assert refused and reader.direct is False
    assert bytes(image[:len(data)].numpy()) == data


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux")
def test_a_file_system_refusing_o_direct_at_open_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    path, data = _file(tmp_path)
    real_open = os.open

    def open_(p, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    reader = WholeFileReader()
    reader.direct = True
    image = aligned_bytes(align_up(len(data)))
    assert reader.read(path, len(data), image) == len(data)
    assert reader.direct is False
    assert bytes(image[:len(data)].numpy()) == data


def test_the_fallback_without_preadv_reads_the_same_bytes(tmp_path, monkeypatch):
    """Windows has no os.preadv: the seek-and-read loop fills the buffer with the same bytes."""
    import model.direct_io as direct_io

    data = bytes(range(256)) * 40 + b"tail"
    (tmp_path / "f").write_bytes(data)
    monkeypatch.delattr(direct_io.os, "preadv")
    image = direct_io.aligned_bytes(direct_io.align_up(len(data)))
    assert direct_io.WholeFileReader().read(tmp_path / "f", len(data), image) == len(data)
    assert bytes(image[:len(data)].numpy()) == data
