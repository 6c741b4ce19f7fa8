"""train() under torchrun: process group, rank-0 checkpoints, agreed signals, resuming on another world size.

The multi-process tests launch tests/scripts/dist_tiny.py (a replicated state) and
tests/scripts/sharded_train.py (a sharded state: DTensor params and optimizer state,
checkpointed as torch.distributed.checkpoint directories) with
``python -m torch.distributed.run --standalone --nproc_per_node=2`` (gloo on CPU).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from functrain.checkpoint import CheckpointManager, is_sharded_checkpoint
from functrain.checkpoint.manager import checkpoint_name
from functrain.data import Loader
from functrain.shell import distributed as dist
from functrain.shell.train import saved_world_size, world_change_message

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dist_tiny.py")
SHARDED_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "sharded_train.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(nproc, directory, *args, script=SCRIPT):
    if nproc == 1:
        return [sys.executable, script, str(directory), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, str(directory), *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _run(nproc, directory, *args, script=SCRIPT):
    proc = subprocess.run(_cmd(nproc, directory, *args, script=script), capture_output=True, text=True, env=_env(),
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _read(path):
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------ single process
def test_torchrun_env_is_read_only_when_complete():
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    assert dist.torchrun_env(full) == {"rank": 1, "world_size": 2, "local_rank": 1}
    assert dist.torchrun_env({"RANK": "0"}) is None
    with pytest.raises(ValueError, match="RANK=3"):
        dist.torchrun_env({**full, "RANK": "3"})


def test_no_group_is_made_without_torchrun_or_with_one_rank():
    assert not dist.init_from_env(torch.device("cpu"), environ={})
    one = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    assert not dist.init_from_env(torch.device("cpu"), environ=one)
    assert not torch.distributed.is_initialized()
    assert dist.backend_for(torch.device("cpu")) == "gloo" and dist.backend_for(torch.device("cuda", 0)) == "nccl"


def test_agreement_is_the_identity_without_a_group():
    assert dist.agree_flag(15) == 15 and dist.agree_flag(0) == 0
    assert dist.agree_ok(True) and not dist.agree_ok(False)
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.check_replicated("ab" * 32)


def test_shard_loader_rebinds_a_loader_made_before_the_group():
    data = torch.utils.data.TensorDataset(torch.arange(32.0))
    loader = Loader(data, 4, seed=1)
    second = dist.shard_loader(loader, 1, 2)
    assert (second.rank, second.world_size, loader.rank, loader.world_size) == (1, 2, 0, 1)
    assert dist.shard_loader(loader, 0, 1) is loader
    first = dist.shard_loader(loader, 0, 2)
    both = first.indices_at(0, 0)[0] + second.indices_at(0, 0)[0]
    assert both == loader.permutation(0)[:8].tolist()  # the two shards are the global batch, in order
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dist.shard_loader(Loader(data, 20), 0, 2)


def test_world_change_warning_names_both_sizes(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"world_size": 2}))
    assert saved_world_size(str(tmp_path)) == 2
    assert saved_world_size(str(tmp_path / "checkpoints" / "step-00000004.msgpack")) == 2
    assert world_change_message(2, 2) is None and world_change_message(None, 1) is None
    assert "2-rank run on 1 rank" in world_change_message(2, 1)


# ------------------------------------------------------------------ torchrun, 2 ranks
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    directory = tmp_path_factory.mktemp("baseline")
    code, out = _run(2, directory, "signal")
    assert code == 0, out[-4000:]
    assert out.count("functrain: started fresh") == 1, out  # only rank 0 prints
    assert not torch.distributed.is_initialized()
    digests = {_read(directory / f"digest-{r}.txt") for r in range(2)}
    assert len(digests) == 1  # the state stays replicated
    return digests.pop()


def _wait_for(path, predicate, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be signalled"
        try:
            if predicate(_read(path)):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {path}")


def _sigterm_rank_1(cmd, directory, at):
    """Run ``cmd`` (2 ranks); SIGTERM rank 1 alone once it passed micro-step ``at``; check both ranks
    stopped with 128 + SIGTERM at the same micro-step >= ``at``; return their exit records."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(directory / "progress-1", lambda t: int(t) >= at, proc)
    os.kill(int(_read(directory / "pid-1")), signal.SIGTERM)  # rank 1 only
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-4000:]
    exits = [json.loads(_read(directory / f"exit-{r}.json")) for r in range(2)]
    assert [e["code"] for e in exits] == [128 + signal.SIGTERM] * 2, out[-4000:]
    assert exits[0]["micro"] == exits[1]["micro"] >= at
    return exits


@pytest.mark.slow
def test_sigterm_to_rank_1_stops_both_ranks_at_one_committed_step_and_resume_is_bitwise(baseline, tmp_path):
    at = random.Random(os.getpid()).randrange(2, 17)  # micro-steps run to 24; the signal may land in evaluation
    exits = _sigterm_rank_1(_cmd(2, tmp_path, "signal", "sleep=0.1"), tmp_path, at)
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.latest_step() == exits[0]["micro"]  # committed before either rank exited
        assert int(manager.restore()["micro_step"]) == exits[0]["micro"]
    assert not (tmp_path / "digest-0.txt").exists()

    code, out = _run(2, tmp_path, "signal")
    assert code == 0, out[-4000:]
    assert "functrain: resumed" in out
    assert _read(tmp_path / "digest-0.txt") == _read(tmp_path / "digest-1.txt") == baseline, f"signalled at {at}"


def _consumed(directory, world):
    """The global sample order a run consumed: per micro-step, rank 0's slice then rank 1's."""
    by_step = {}
    for r in range(world):
        path = directory / f"samples-w{world}-r{r}.jsonl"
        for line in _read(path).splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["micro"], {})[r] = rec["idx"]
    return {step: [i for r in sorted(parts) for i in parts[r]] for step, parts in by_step.items()}


def _expected_order():
    from helpers.tiny import dataset  # noqa: PLC0415 -- tests/ is on sys.path under pytest

    loader = Loader(dataset(96, 0), 16, shuffle=True, seed=3)
    return loader.permutation(0).tolist() + loader.permutation(1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_from_the_global_sample(tmp_path, first, second):
    code, out = _run(first, tmp_path, "samples", "steps=4", "user_group=1")
    assert code == 0, out[-4000:]
    code, out = _run(second, tmp_path, "samples", "steps=9")
    assert code == 0, out[-4000:]
    assert f"resuming a {first}-rank run on {second} rank(s)" in out, out[-4000:]
    before, after = _consumed(tmp_path, first), _consumed(tmp_path, second)
    assert sorted(before) == [1, 2, 3, 4] and sorted(after) == [5, 6, 7, 8, 9]
    order = [i for s in sorted(before) for i in before[s]] + [i for s in sorted(after) for i in after[s]]
    assert order == _expected_order()[: 9 * 16]  # epoch 0 whole, then epoch 1: none skipped or repeated
    for world, made_by_script in ((first, first > 1), (second, False)):
        for r in range(world):  # train() leaves a group the script made, and tears down the one it made itself
            group = json.loads(_read(tmp_path / f"group-w{world}-r{r}.json"))
            assert group == {"user_group": made_by_script, "after": made_by_script}


# ------------------------------------------------------------------ torchrun, 2 ranks, a sharded state
def _sharded(nproc, directory, tag, *args):
    """Run sharded_train.py; return rank 0's record (digests of the first step's input and of the final state)."""
    code, out = _run(nproc, directory, tag, *args, script=SHARDED_SCRIPT)
    assert code == 0, out[-4000:]
    return json.loads(_read(directory / f"{tag}.json")), out


def _listing(directory):
    return sorted(os.listdir(directory / "checkpoints"))


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """2 sharded ranks trained to step 10 at once; and to step 6 (checkpoints every 2, async manager: a sharded
    save is synchronous anyway), then resumed to 10 on 2 ranks and, from a copy of the folder, in one process."""
    import shutil  # noqa: PLC0415

    whole, cut = tmp_path_factory.mktemp("sharded-whole"), tmp_path_factory.mktemp("sharded-cut")
    runs = {"whole": _sharded(2, whole, "whole", "steps=10")[0]}
    runs["cut"], out = _sharded(2, cut, "cut", "steps=6", "async=1")
    assert "functrain: started fresh" in out
    listing = _listing(cut)
    alone = tmp_path_factory.mktemp("sharded-alone") / "run"
    shutil.copytree(cut, alone)
    runs["resumed"], out = _sharded(2, cut, "resumed", "steps=10", "async=1")
    assert "functrain: resumed" in out and "resuming a" not in out, out[-4000:]
    runs["alone"], alone_out = _sharded(1, alone, "alone", "steps=10")
    return runs, {"cut": listing, "resumed": _listing(cut), "alone": _listing(alone)}, cut, (alone, alone_out)


@pytest.mark.slow
def test_sharded_train_stopped_and_resumed_on_two_ranks_is_bitwise_the_uninterrupted_run(sharded_runs):
    runs, _, _, _ = sharded_runs
    assert runs["whole"]["first_sharded"] and runs["whole"]["final_sharded"] and runs["resumed"]["first_sharded"]
    assert runs["resumed"]["first"] == runs["cut"]["final"]  # restored bitwise: the state saved at step 6
    assert runs["resumed"]["first"] != runs["whole"]["first"]  # (it did resume, not start again)
    assert runs["resumed"]["final"] == runs["whole"]["final"]


@pytest.mark.slow
def test_two_rank_sharded_checkpoint_resumes_in_one_process_with_the_world_size_warning(sharded_runs):
    runs, listings, _, (_, out) = sharded_runs
    assert not runs["alone"]["first_sharded"]  # a plain state in one process
    assert runs["alone"]["first"] == runs["cut"]["final"]  # the 2-rank shards, resharded bitwise into one state
    assert "resuming a 2-rank run on 1 rank(s)" in out, out[-4000:]
    assert runs["alone"]["final"] != runs["cut"]["final"]  # it trained on to step 10
    # its own checkpoints are msgpack files (a plain state); the 2-rank directories were retired by keep_last=2
    assert listings["alone"] == ["index.json", checkpoint_name(8), checkpoint_name(10)]


@pytest.mark.slow
def test_sharded_checkpoints_are_directories_kept_by_retention_without_leftovers(sharded_runs):
    _, listings, cut, _ = sharded_runs
    assert listings["cut"] == ["index.json", checkpoint_name(4, "dcp"), checkpoint_name(6, "dcp")]
    assert listings["resumed"] == ["index.json", checkpoint_name(8, "dcp"), checkpoint_name(10, "dcp")]
    step_dir = cut / "checkpoints" / checkpoint_name(10, "dcp")
    assert is_sharded_checkpoint(step_dir) and saved_world_size(str(step_dir)) == 2
    index = json.loads(_read(cut / "checkpoints" / "index.json"))
    assert sorted(index["checkpoints"]) == ["10", "8"] and index["checkpoints"]["10"]["kind"] == "dcp"
    with CheckpointManager(cut / "checkpoints") as manager:
        assert manager.latest_step() == 10 and manager.kind_of(10) == "dcp"


@pytest.mark.slow
def test_sigterm_to_rank_1_saves_every_rank_s_shards_and_the_sharded_resume_is_bitwise(sharded_runs, tmp_path):
    runs, _, _, _ = sharded_runs
    at = random.Random(os.getpid()).randrange(1, 7)  # steps run to 10; the signal may land in an evaluation
    exits = _sigterm_rank_1(_cmd(2, tmp_path, "signalled", "steps=10", "sleep=0.2", script=SHARDED_SCRIPT),
                            tmp_path, at)
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.latest_step() == exits[0]["micro"] and manager.kind_of(exits[0]["micro"]) == "dcp"
    assert not [n for n in _listing(tmp_path) if n.endswith(".partial")]
    resumed, out = _sharded(2, tmp_path, "after-signal", "steps=10")
    assert "functrain: resumed" in out
    assert resumed["final"] == runs["whole"]["final"], f"signalled at {at}"


@pytest.mark.slow
def test_msgpack_checkpoint_of_a_plain_run_resumes_into_a_sharded_state(sharded_runs):
    runs, _, _, (alone, _) = sharded_runs  # the one-process run left msgpack files of step 8 and 10
    record, out = _sharded(2, alone, "sharded-again", "steps=12")
    assert record["first_sharded"] and record["first"] == runs["alone"]["final"]  # read whole, sharded: bitwise
    assert "resuming a 1-rank run on 2 rank(s)" in out, out[-4000:]
    assert _listing(alone) == ["index.json", checkpoint_name(10), checkpoint_name(12, "dcp")]
