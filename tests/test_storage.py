"""pipeline/storage.py's whole writes: a reader sees the old object or the new one, never a part, and a write that
fails leaves nothing behind."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import storage


@settings(max_examples=25, deadline=None)
@given(old=st.binary(max_size=4096), new=st.binary(max_size=4096), fails_after=st.integers(0, 4096))
def test_a_write_that_fails_part_way_leaves_the_old_object_and_no_temporary_file(tmp_path_factory, old, new,
                                                                                  fails_after):
    folder = tmp_path_factory.mktemp("whole")
    path = str(folder / "marker.json")
    storage.write_bytes(path, old)

    def fill(f):
        f.write(new[:fails_after])
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        storage._write_stream(path, fill)
    assert storage.read_bytes(path) == old
    assert os.listdir(folder) == ["marker.json"]
    storage.write_bytes(path, new)
    assert storage.read_bytes(path) == new and os.listdir(folder) == ["marker.json"]


def test_upload_and_download_copy_whole_files(tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "local.bin").write_bytes(data)
    storage.upload(str(tmp_path / "local.bin"), f"file://{tmp_path}/sub/remote.bin")
    storage.download(str(tmp_path / "sub" / "remote.bin"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert sorted(os.listdir(tmp_path / "sub")) == ["remote.bin"]


def test_timestamped_names_sort_by_time_and_differ_within_one_second():
    names = [storage.timestamped_name() for _ in range(20)]  # 24 random bits: a repeat among 20 is 1 in 80,000
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", name) for name in names)
    assert len(set(names)) == len(names) and names == sorted(names, key=lambda name: name[:16])
