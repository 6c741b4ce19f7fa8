"""The examples run end to end (tiny settings), resume, and leave checkpoints, results and logs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def run_example(name, *args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name,args", [
    ("digits_mlp.py", ["steps=20", "eval_every=10", "checkpoint_every=10"]),
    ("char_transformer.py", ["steps=4", "eval_every=2", "checkpoint_every=2", "width=32", "layers=1", "context=16"]),
])
def test_example_trains_checkpoints_and_resumes(tmp_path, name, args):
    run_dir = tmp_path / "run"
    out = run_example(name, *args, f"checkpoint_dir={run_dir}", "progress=false")
    assert str(run_dir) in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results, "results.json is empty"
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.rglob("*"))
    steps = [int(a.split("=")[1]) for a in args if a.startswith("steps=")][0]
    more = run_example(name, *[a for a in args if not a.startswith("steps=")], f"steps={steps + 2}",
                       f"checkpoint_dir={run_dir}", "progress=false")
    assert "resumed" in more
