"""Sharded states (DTensor params and optimizer state): 2 gloo ranks under torchrun against 1 process.

The script trains a float64 MLP whose layers split unevenly over 2 ranks (15 and 3 rows),
with AdamW, global-norm clipping and accumulation over 2 micro-steps.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import functrain as ft

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "sharded_run.py")


def run(out, tag, nproc, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([sys.executable, *launcher, SCRIPT, str(out), tag, *map(str, extra)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return dict(np.load(out / f"{tag}.npz"))


def assert_close(a, b, rtol):
    names = [k for k in b if not k.startswith("__")]
    assert names and set(names) == {k for k in a if not k.startswith("__")}
    for k in names:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-12, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with the whole batch, and 2 sharded ranks; both save at step 9, run to 20."""
    out = tmp_path_factory.mktemp("sharded")
    return out, {
        "one": run(out, "one", 1, "--save-at", 9, out / "ckpt-one"),
        "sharded": run(out, "sharded", 2, "--sharded", "--save-at", 9, out / "ckpt-sharded"),
    }


@pytest.mark.slow
def test_sharded_two_ranks_match_one_process_with_the_global_batch(runs):
    _, r = runs
    assert bool(r["sharded"]["__sharded"]) and not bool(r["one"]["__sharded"])
    # rank 0 held its own rows only: 8 of fc1's 15, 2 of fc2's 3
    assert eval(str(r["sharded"]["__local_shapes"]))["fc1.weight"] == [8, 8]
    assert eval(str(r["sharded"]["__local_shapes"]))["fc2.bias"] == [2]
    assert_close(r["sharded"], r["one"], rtol=1e-9)  # params and Adam moments
    np.testing.assert_allclose(r["sharded"]["__loss"], r["one"]["__loss"], rtol=1e-6)


@pytest.mark.slow
def test_evaluation_over_two_ranks_counts_every_sample_once(runs):
    # 13 samples: 6 on rank 0, 7 on rank 1; a padded or rank-0-only evaluation would differ
    _, r = runs
    np.testing.assert_allclose(r["sharded"]["__eval"], r["one"]["__eval"], rtol=1e-12)


@pytest.mark.slow
def test_sharded_run_resumes_bitwise_on_the_same_world_size(runs):
    out, r = runs
    resumed = run(out, "sharded-resumed", 2, "--sharded", "--resume", out / "ckpt-sharded")
    assert str(resumed["__loaded_digest"]) == str(r["sharded"]["__saved_digest"])
    assert str(resumed["__digest"]) == str(r["sharded"]["__digest"])


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_in_one_process(runs):
    out, r = runs
    resumed = run(out, "one-from-sharded", 1, "--resume", out / "ckpt-sharded")
    assert not bool(resumed["__sharded"])
    assert str(resumed["__loaded_digest"]) == str(r["sharded"]["__saved_digest"])  # resharded bitwise
    assert_close(resumed, r["one"], rtol=1e-9)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_sharded_on_two_ranks(runs):
    out, r = runs
    resumed = run(out, "sharded-from-one", 2, "--sharded", "--resume", out / "ckpt-one")
    assert bool(resumed["__sharded"])
    assert str(resumed["__loaded_digest"]) == str(r["one"]["__saved_digest"])
    assert_close(resumed, r["one"], rtol=1e-9)


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_sharded_step_is_one_graph_and_matches_eager(runs):
    out, r = runs
    compiled = run(out, "sharded-compiled", 2, "--sharded", "--compile")
    assert int(compiled["__graphs"]) == 1
    assert_close(compiled, r["sharded"], rtol=1e-9)


@pytest.mark.slow
def test_torch_func_still_cannot_differentiate_through_dtensors(tmp_path):
    # The reason the sharded step gathers outside torch.func.grad (docs/distributed.md). If this
    # fails, a torch release fixed it: revisit the design (gather layer by layer inside the loss).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(os.path.dirname(__file__), "scripts", "dtensor_func_grad.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "func.grad over a DTensor weight fails: RuntimeError: aten.mm.default got mixed" in out
    assert "func.grad through DTensor.full_tensor fails" in out
    assert "func.grad through all_gather_single fails" in out and "setup_context" in out
    assert "autograd.grad through DTensor.full_tensor (not torch.func) ok" in out  # the control


# ------------------------------------------------------------ one process, no torchrun


def small_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = ft.optim.adam(1e-2)
    return model, opt, ft.TrainState.create(model, opt, seed=1)


def test_save_and_load_sharded_without_a_process_group(tmp_path):
    model, opt, state = small_state()
    step = ft.make_train_step(model, lambda f, b: f(b).square().mean(), opt)
    state = step(state, torch.ones(4, 3))
    ft.checkpoint.save_sharded(tmp_path / "ck", state)
    assert ft.checkpoint.is_sharded_checkpoint(tmp_path / "ck")
    target = ft.TrainState.create(model, opt, seed=5)
    before = ft.tree_digest(target)
    loaded = ft.checkpoint.load_sharded(tmp_path / "ck", target)
    assert ft.tree_digest(loaded) == ft.tree_digest(state)
    assert ft.tree_digest(target) == before  # the target is not filled in place


def test_load_sharded_names_the_paths_that_differ(tmp_path):
    _, opt, state = small_state()
    ft.checkpoint.save_sharded(tmp_path / "ck", state)
    other = ft.TrainState.create(torch.nn.Linear(3, 5), opt)
    wrong = r"params/weight: checkpoint float32 \(2, 3\), target float32 \(5, 3\)"
    with pytest.raises(ft.TargetMismatchError, match=wrong):
        ft.checkpoint.load_sharded(tmp_path / "ck", other)
    with pytest.raises(ft.TargetMismatchError, match="in the checkpoint only"):
        ft.checkpoint.load_sharded(tmp_path / "ck", ft.TrainState.create(torch.nn.Linear(3, 2), ft.optim.sgd(0.1)))


def test_incomplete_or_missing_sharded_checkpoints_are_refused(tmp_path):
    _, _, state = small_state()
    with pytest.raises(ft.CheckpointError, match="no such sharded checkpoint"):
        ft.checkpoint.load_sharded(tmp_path / "nothing", state)
    ft.checkpoint.save_sharded(tmp_path / "ck", state)
    os.remove(tmp_path / "ck" / ft.checkpoint.sharded.META_NAME)  # as if killed before the last write
    with pytest.raises(ft.CheckpointError, match="not a complete functrain sharded checkpoint"):
        ft.checkpoint.load_sharded(tmp_path / "ck", state)


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path):
    model, opt, state = small_state()
    ft.checkpoint.save_sharded(tmp_path / "ck", state)
    later = ft.make_train_step(model, lambda f, b: f(b).square().mean(), opt)(state, torch.ones(4, 3))
    (tmp_path / "ck.partial").mkdir()  # debris of a killed save is cleared, not read
    ft.checkpoint.save_sharded(tmp_path / "ck", later)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert ft.tree_digest(ft.checkpoint.load_sharded(tmp_path / "ck", state)) == ft.tree_digest(later)


def test_shard_state_needs_a_process_group():
    _, _, state = small_state()
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        ft.shard_state(state)
