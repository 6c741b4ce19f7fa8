"""Reproducibility across processes, SIGTERM and SIGKILL (subprocess runs of tests/scripts/run_tiny.py).

The runs use dropout, shuffling, accumulation 2, num_workers=2, evaluation every 3 steps,
and async checkpoints at every step.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "run_tiny.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(directory, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, SCRIPT, str(directory), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(directory, *args):
    proc = _start(directory, *args)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _outcome(directory):
    with open(os.path.join(directory, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(directory, "digest.txt")) as f:
        return f.read(), results


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    directory = tmp_path_factory.mktemp("baseline")
    code, out = _run(directory)
    assert code == 0, out
    return _outcome(directory)


@pytest.mark.slow
def test_same_run_in_another_process_gives_the_same_digest(baseline, tmp_path):
    code, out = _run(tmp_path)
    assert code == 0, out
    assert _outcome(tmp_path) == baseline


@pytest.mark.slow
def test_sigterm_at_a_random_step_then_resume_is_bitwise_equal(baseline, tmp_path):
    micro = random.Random(os.getpid()).randrange(2, 23)
    code, out = _run(tmp_path, f"signal_at={micro}")
    assert code == 128 + signal.SIGTERM, out
    assert not os.path.exists(tmp_path / "digest.txt")
    code, out = _run(tmp_path)
    assert code == 0, out
    assert _outcome(tmp_path) == baseline, f"interrupted at micro-step {micro}"


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_equal(baseline, tmp_path):
    rng = random.Random()
    killed = 0
    for trial in range(5):
        directory = tmp_path / f"trial{trial}"
        proc = _start(directory, "sleep=0.02")
        checkpoints = directory / "checkpoints"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (
            checkpoints.exists() and any(p.suffix == ".msgpack" for p in checkpoints.iterdir())
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.communicate(timeout=60)
        code, out = _run(directory)
        assert code == 0, out
        digest, results = _outcome(directory)
        assert digest == baseline[0], f"trial {trial}"
        assert results == baseline[1] and results["best_step"] == baseline[1]["best_step"]
    assert killed >= 3  # most trials must really kill a running process
