"""CheckpointManager: naming, retention, best tracking, async saves, fallback and failure handling."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
import torch

from functrain.checkpoint import files, is_sharded_checkpoint, manager, tree_digest
from functrain.checkpoint.errors import CheckpointSaveError, TargetMismatchError
from functrain.checkpoint.manager import CheckpointManager, checkpoint_name
from functrain.core.state import TrainState
from functrain.testing import assert_trees_equal


def state_at(step: int) -> dict:
    return {"w": torch.full((3,), float(step)), "step": torch.tensor(step)}


def test_names_retention_and_best_in_min_mode(tmp_path) -> None:
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.2, 5: 0.7, 6: 0.8}
    with CheckpointManager(tmp_path, keep_last=2, keep_best=2, best_metric="val/loss", mode="min") as mgr:
        for step, loss in losses.items():
            mgr.save(state_at(step), step=step, metrics={"val/loss": loss})
        assert mgr.all_steps() == [2, 4, 5, 6] and mgr.best_step() == 2 and mgr.latest_step() == 6
    assert sorted(os.listdir(tmp_path)) == sorted([checkpoint_name(s) for s in (2, 4, 5, 6)] + ["index.json"])
    assert checkpoint_name(1200) == "step-00001200.msgpack"
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(index["checkpoints"]) == ["2", "4", "5", "6"] and index["checkpoints"]["4"]["metrics"] == {
        "val/loss": 0.2}
    reopened = CheckpointManager(tmp_path, keep_last=2, keep_best=2, best_metric="val/loss", mode="min")
    assert reopened.best_step() == 2 and reopened.restore(state_at(0), step="best")["w"][0] == 2


def test_max_mode_keeps_the_highest_metric_even_for_a_metric_named_loss(tmp_path) -> None:
    with CheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="loss", mode="max") as mgr:
        for step, value in [(1, 0.3), (2, 0.9), (3, 0.1), (4, float("nan"))]:
            mgr.save(state_at(step), step=step, metrics={"loss": value})
        assert mgr.all_steps() == [2, 4] and mgr.best_step() == 2


def test_step_defaults_to_state_step_and_restore_rebuilds_the_train_state(tmp_path) -> None:
    state = TrainState.create(torch.nn.Linear(3, 2), seed=1).replace(step=torch.tensor(40))
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.save(state) == 40
        restored = mgr.restore(TrainState.create(torch.nn.Linear(3, 2), seed=2))
    assert_trees_equal(restored, state)
    with pytest.raises(TargetMismatchError, match="params/weight: shape"):
        CheckpointManager(tmp_path).restore(TrainState.create(torch.nn.Linear(4, 2)))


def test_restore_falls_back_when_the_latest_is_corrupt(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(state_at(step), step=step)
    latest = tmp_path / checkpoint_name(3)
    data = bytearray(latest.read_bytes())
    data[-3] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"{latest}: checksum mismatch"):
        restored = mgr.restore(state_at(0))
    assert restored["w"][0] == 2
    assert mgr.restore(state_at(0), step=1)["w"][0] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 9"):
        mgr.restore(state_at(0), step=9)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        CheckpointManager(tmp_path / "empty").restore(state_at(0))


def test_stray_temp_files_are_ignored_and_removed(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(state_at(1), step=1)
    stray = tmp_path / (checkpoint_name(5) + files.TEMP_MARK + "123-abcd")
    stray.write_bytes(b"partial")
    assert mgr.all_steps() == [1] and mgr.restore(state_at(0))["w"][0] == 1
    CheckpointManager(tmp_path)
    assert not stray.exists() and (tmp_path / checkpoint_name(1)).exists()


def test_disk_full_during_save_raises_and_keeps_older_checkpoints(tmp_path, monkeypatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(state_at(1), step=1)

    def full_disk(tree, write):
        write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "encode", full_disk)
    with pytest.raises(CheckpointSaveError, match="No space left"):
        mgr.save(state_at(2), step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted([checkpoint_name(1), "index.json"])
    assert mgr.all_steps() == [1] and mgr.restore(state_at(0))["w"][0] == 1


def test_async_save_snapshots_before_returning_and_reports_errors_later(tmp_path, monkeypatch) -> None:
    gate = threading.Event()
    real_save = manager.save
    in_flight, most = [0], [0]

    def slow_save(path, tree, *check):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        gate.wait(5)
        try:
            return real_save(path, tree, *check)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(manager, "save", slow_save)
    mgr = CheckpointManager(tmp_path, keep_last=5, async_save=True)
    live = state_at(1)
    mgr.save(live, step=1, copy=True)
    live["w"].add_(100.0)  # the caller mutates its tensors right after save returns (donated buffers)
    assert mgr.all_steps() == []  # not committed yet: the write is held at the gate
    threading.Timer(0.2, gate.set).start()
    mgr.save(state_at(2), step=2)  # waits for the first save: one in flight
    mgr.wait()
    assert most[0] == 1 and mgr.all_steps() == [1, 2]
    assert mgr.restore(state_at(0), step=1)["w"].tolist() == [1.0, 1.0, 1.0]

    def broken_save(path, tree, *check):
        raise CheckpointSaveError(errno.EACCES, "permission denied")

    monkeypatch.setattr(manager, "save", broken_save)
    mgr.save(state_at(3), step=3)  # fails in the background
    time.sleep(0.05)
    with pytest.raises(CheckpointSaveError, match="permission denied"):
        mgr.save(state_at(4), step=4)
    monkeypatch.setattr(manager, "save", real_save)
    mgr.save(state_at(4), step=4)
    mgr.close()
    assert mgr.all_steps() == [1, 2, 4]
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save(state_at(5), step=5)


def test_async_default_writes_the_callers_cpu_tensors_without_copying(tmp_path, monkeypatch) -> None:
    written = []
    real_save = manager.save

    def spy_save(path, tree, *check):
        written.append(tree)
        return real_save(path, tree, *check)

    monkeypatch.setattr(manager, "save", spy_save)
    live, copied = state_at(7), state_at(8)
    with CheckpointManager(tmp_path, keep_last=5, async_save=True) as mgr:
        mgr.save(live, step=7)
        mgr.save(copied, step=8, copy=True)
        mgr.wait()
        assert written[0]["w"] is live["w"]  # no host copy: the writer read the caller's tensor
        assert written[1]["w"] is not copied["w"] and torch.equal(written[1]["w"], copied["w"])
        assert_trees_equal(mgr.restore(state_at(0), step=7), live)


def test_async_save_without_copy_refuses_a_state_changed_in_place_during_the_write(tmp_path, monkeypatch) -> None:
    gate = threading.Event()
    real_save = manager.save

    def held_save(path, tree, *check):
        gate.wait(5)
        return real_save(path, tree, *check)

    monkeypatch.setattr(manager, "save", held_save)
    mgr = CheckpointManager(tmp_path, keep_last=5, async_save=True)
    mgr.save(state_at(1), step=1)
    gate.set()
    mgr.wait()
    gate.clear()
    live = state_at(2)
    mgr.save(live, step=2)  # default: no copy of CPU tensors
    live["w"].add_(100.0)  # breaks the contract while the write is held
    gate.set()
    with pytest.raises(manager.CheckpointMutatedError, match="w changed in place.*copy=True"):
        mgr.wait()
    assert mgr.all_steps() == [1]  # nothing committed, no stray temporary file
    assert sorted(os.listdir(tmp_path)) == sorted([checkpoint_name(1), "index.json"])
    mgr.close()


def test_close_drains_and_reraises_a_background_error(tmp_path, monkeypatch) -> None:
    def broken_save(path, tree, *check):
        raise CheckpointSaveError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(manager, "save", broken_save)
    with pytest.raises(CheckpointSaveError, match="disk full"):
        with CheckpointManager(tmp_path, async_save=True) as mgr:
            mgr.save(state_at(1), step=1)


def test_invalid_settings_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="minimize")
    with pytest.raises(ValueError, match="pass step="):
        CheckpointManager(tmp_path).save({"w": torch.ones(1)})
    with pytest.raises(ValueError, match="format must be one of"):
        CheckpointManager(tmp_path, format="pickle")


# ------------------------------------------------------------------ sharded (DCP) directories, one process
# The manager writes a state holding DTensors as a step-N.dcp directory (every rank calls save); the
# multi-rank cases run under torchrun in tests/test_distributed.py. format="dcp" writes a plain state
# the same way, which exercises the same code here without a process group.


def train_state(seed: int, step: int) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return TrainState.create(model, seed=seed).replace(step=torch.tensor(step), micro_step=torch.tensor(step),
                                                       metrics={"loss": torch.tensor(0.5 * step)})


def test_dcp_format_writes_directories_with_retention_and_restores_into_a_target(tmp_path) -> None:
    saved = {}
    with CheckpointManager(tmp_path, keep_last=2, keep_best=1, best_metric="loss", format="dcp",
                           async_save=True) as mgr:  # a sharded save is synchronous even so
        for step, loss in [(1, 0.1), (2, 0.9), (3, 0.8), (4, 0.7)]:
            saved[step] = train_state(step, step)
            mgr.save(saved[step], metrics={"loss": loss})
            assert mgr.all_steps()[-1] == step  # committed when save returns
        assert mgr.all_steps() == [1, 3, 4] and mgr.best_step() == 1 and mgr.kind_of(4) == "dcp"
        assert mgr.path_of(4) == str(tmp_path / checkpoint_name(4, "dcp")) and mgr.kind_of(2) is None
    assert sorted(os.listdir(tmp_path)) == ["index.json"] + [checkpoint_name(s, "dcp") for s in (1, 3, 4)]
    assert all(is_sharded_checkpoint(tmp_path / checkpoint_name(s, "dcp")) for s in (1, 3, 4))
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["checkpoints"]["3"] == {"kind": "dcp", "metrics": {"loss": 0.8}}
    reopened = CheckpointManager(tmp_path, keep_last=2, best_metric="loss")  # format="auto" reads both kinds
    target = train_state(99, 0)
    assert tree_digest(reopened.restore(target)) == tree_digest(saved[4])
    assert tree_digest(reopened.restore(target, step="best")) == tree_digest(saved[1])
    assert torch.equal(reopened.restore(target, step=3).params["weight"], saved[3].params["weight"])
    with pytest.raises(ValueError, match="sharded checkpoint.*pass target="):
        reopened.restore(None)
    with pytest.raises(TargetMismatchError, match="params/weight"):
        reopened.restore(TrainState.create(torch.nn.Linear(4, 2)))


def test_unfinished_sharded_saves_are_ignored_and_cleaned_and_nothing_saved_is_lost(tmp_path) -> None:
    with CheckpointManager(tmp_path, keep_last=5, format="dcp") as mgr:
        for step in (1, 2, 3):
            mgr.save(train_state(step, step))
    partial = tmp_path / (checkpoint_name(9, "dcp") + ".partial")  # a save killed before its rename
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    incomplete = tmp_path / checkpoint_name(8, "dcp")  # no metadata: never committed (not by functrain)
    incomplete.mkdir()
    trash = tmp_path / (checkpoint_name(0, "dcp") + ".trash")  # a deletion killed half way
    trash.mkdir()
    # a replacing save of step 3 killed between its two renames: only step-3.dcp.old holds step 3
    os.replace(tmp_path / checkpoint_name(3, "dcp"), tmp_path / (checkpoint_name(3, "dcp") + ".old"))
    assert mgr.all_steps() == [1, 2]
    reopened = CheckpointManager(tmp_path, keep_last=5)
    assert reopened.all_steps() == [1, 2, 3]  # step 3 put back, not deleted
    assert not partial.exists() and not trash.exists() and incomplete.exists()
    assert tree_digest(reopened.restore(train_state(0, 0))) == tree_digest(train_state(3, 3))


def test_unreadable_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, format="dcp")
    for step in (1, 2):
        mgr.save(train_state(step, step))
    for name in os.listdir(tmp_path / checkpoint_name(2, "dcp")):
        if name.endswith(".distcp"):
            os.unlink(tmp_path / checkpoint_name(2, "dcp") / name)
    with pytest.warns(UserWarning, match=r"falling back.*step-00000002\.dcp.*No such file"):
        restored = mgr.restore(train_state(0, 0))
    assert tree_digest(restored) == tree_digest(train_state(1, 1))


def test_a_step_saved_again_in_the_other_format_replaces_the_old_kind(tmp_path) -> None:
    plain = CheckpointManager(tmp_path, keep_last=5)
    plain.save(train_state(1, 1))
    plain.save(train_state(2, 2))
    sharded = CheckpointManager(tmp_path, keep_last=5, format="dcp")
    sharded.save(train_state(5, 2))  # step 2 again, as a directory: the stale file goes
    assert sharded.all_steps() == [1, 2] and sharded.kind_of(1) == "msgpack" and sharded.kind_of(2) == "dcp"
    assert not (tmp_path / checkpoint_name(2)).exists()
    assert tree_digest(sharded.restore(train_state(0, 0))) == tree_digest(train_state(5, 2))
    plain.save(train_state(6, 2))  # and back to a file: the stale directory goes
    assert plain.kind_of(2) == "msgpack" and not (tmp_path / checkpoint_name(2, "dcp")).exists()
    assert tree_digest(plain.restore(train_state(0, 0))) == tree_digest(train_state(6, 2))
