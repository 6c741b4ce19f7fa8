"""Data parallelism inside the pure step: 2 ranks (torchrun, gloo) against 1 rank with the whole batch."""

import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dp_equivalence.py")


def run(tmp_path, config, nproc, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, SCRIPT, str(tmp_path), config, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               SCRIPT, str(tmp_path), config, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(tmp_path / f"params-{nproc}.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["sgd", "adamw_clip_accum"])
def test_two_ranks_match_one_rank_with_the_global_batch(tmp_path, config):
    one = run(tmp_path, config, 1)
    two = run(tmp_path, config, 2)
    for name in one:
        if name.startswith("__"):
            continue
        np.testing.assert_allclose(two[name], one[name], rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(two["__loss"], one["__loss"], rtol=1e-6)


@pytest.mark.slow
def test_without_gradient_averaging_the_ranks_diverge(tmp_path):
    # the control for the test above: each rank stepping on its own half differs from the global batch
    one = run(tmp_path, "sgd", 1)
    two = run(tmp_path, "sgd", 2, "--no-dp")
    assert not np.allclose(two["fc1.weight"], one["fc1.weight"], rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_data_parallel_step_is_one_graph(tmp_path):
    eager = run(tmp_path, "sgd", 1)
    two = run(tmp_path, "sgd", 2, "--compile")
    assert int(two["__graphs"]) == 1
    for name in eager:
        if not name.startswith("__"):
            np.testing.assert_allclose(two[name], eager[name], rtol=1e-6, atol=1e-9, err_msg=name)
