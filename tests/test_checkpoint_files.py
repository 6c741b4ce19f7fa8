"""Atomic, streamed save/load: round trips, error reporting, crash safety, memory."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest
import torch

from functrain.checkpoint import files
from functrain.checkpoint.errors import CheckpointError, CheckpointSaveError
from functrain.checkpoint.files import load, read_header, save, verify
from functrain.checkpoint.format import HEADER_SIZE, to_bytes, tree_digest
from functrain.testing import assert_trees_equal


def test_save_load_round_trip_and_file_equals_to_bytes(tmp_path) -> None:
    tree = {"w": torch.randn(3, 4), "step": torch.tensor(5), "name": "run"}
    path = tmp_path / "c.msgpack"
    digest = save(path, tree)
    assert path.read_bytes() == to_bytes(tree)
    assert digest == tree_digest(tree) == read_header(path).digest == verify(path).digest
    assert_trees_equal(load(path, target=tree), tree)
    assert os.listdir(tmp_path) == ["c.msgpack"]


def test_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "bad.msgpack"
    save(path, {"w": torch.ones(1000)})
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match=rf"{path}: the file is truncated"):
        load(path)
    path.write_bytes(data[:HEADER_SIZE] + bytes(len(data) - HEADER_SIZE))
    with pytest.raises(CheckpointError, match=rf"{path}: (corrupt|checksum)"):
        load(path)
    with pytest.raises(CheckpointError, match=rf"{path}: (corrupt|checksum)"):
        verify(path)
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: not a functrain checkpoint: .*torch.save"):
        load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load(tmp_path / "missing.msgpack")


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_an_oserror_during_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "c.msgpack"
    old = {"w": torch.zeros(100)}
    save(path, old)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        def encode_then_fail(tree, write):
            write(b"x" * 1000)
            fail()
        monkeypatch.setattr(files, "encode", encode_then_fail)
    else:
        monkeypatch.setattr(files.os, where, fail)
    with pytest.raises(CheckpointSaveError, match="No space left on device.*intact") as err:
        save(path, {"w": torch.ones(100)})
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.msgpack"]
    assert_trees_equal(load(path, target=old), old)


def test_save_streams_peak_python_memory_is_far_below_state_size(tmp_path) -> None:
    state = {f"layer{i}": torch.full((1 << 20,), float(i)) for i in range(16)}  # 16 x 4 MiB = 64 MiB
    tracemalloc.start()
    try:
        save(tmp_path / "c.msgpack", state)
        _, peak_save = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        tree_digest(state)
        _, peak_digest = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_array = 4 << 20
    assert peak_save < one_array and peak_digest < one_array, (peak_save, peak_digest)
    assert_trees_equal(load(tmp_path / "c.msgpack"), state)


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from functrain.checkpoint.files import save
    states = [{f"t{i}": torch.full((5 << 20,), float(v)) for i in range(10)} for v in (1, 2)]  # 200 MB each
    n = 0
    while True:
        print("saving", flush=True)
        save(sys.argv[1], states[n % 2])
        n += 1
""")


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_complete_old_or_new_file(tmp_path) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "c.msgpack"
    digests = {tree_digest({f"t{i}": torch.full((5 << 20,), float(v)) for i in range(10)}) for v in (1, 2)}
    rng = random.Random(0)
    killed_mid_write = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path), root], stdout=subprocess.PIPE,
                                text=True)
        for _ in range(1 + attempt % 2):  # kill during the first save, or during an overwrite
            assert proc.stdout.readline().strip() == "saving"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if path.exists():
            assert verify(path).digest in digests
        leftovers = [n for n in os.listdir(tmp_path) if n != "c.msgpack"]
        assert all(files.TEMP_MARK in n for n in leftovers), leftovers
        killed_mid_write += bool(leftovers)
        for n in leftovers:
            os.unlink(tmp_path / n)
    assert path.exists() and killed_mid_write >= 1  # the kills did land inside writes
