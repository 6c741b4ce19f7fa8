"""The functrain command line: inspect, diff, verify."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from functrain.checkpoint import save
from functrain.cli import main


@pytest.fixture
def files_ab(tmp_path):
    a = {"step": torch.tensor(1200), "params": {"w": torch.zeros(4, 8), "b": torch.ones(3, dtype=torch.bfloat16)},
         "opt": [torch.tensor(1.0), None], "name": "run"}
    b = {**a, "params": {"w": torch.zeros(4, 8), "b": torch.ones(3, dtype=torch.bfloat16)}}
    b["params"]["w"][1, 2] = 0.5
    b["params"]["w"][3, 3] = -2.0
    paths = tmp_path / "a.msgpack", tmp_path / "b.msgpack"
    save(paths[0], a)
    save(paths[1], b)
    return paths


def test_inspect_shows_header_step_leaves_and_totals(files_ab, capsys) -> None:
    assert main(["inspect", str(files_ab[0])]) == 0
    out = capsys.readouterr().out
    assert "format version:  1" in out and "step:            1200" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("params/", "opt/"))}
    assert lines["params/w"][1:5] == ["(4,", "8)", "float32", "128"]
    assert lines["params/b"][1:4] == ["(3,)", "bfloat16", "6"]
    assert "opt/1" in lines and "None" in lines["opt/1"]
    assert "4 arrays, 37 elements, 146 bytes" in out


def test_diff_reports_each_differing_leaf_and_exits_1(files_ab, tmp_path, capsys) -> None:
    assert main(["diff", str(files_ab[0]), str(files_ab[0])]) == 0
    assert main(["diff", *map(str, files_ab)]) == 1
    out = capsys.readouterr().out
    assert "params/w: 2 of 32 elements differ, max abs diff 2, max rel diff 1" in out
    assert "params/b" not in out.split("difference(s)")[1]
    other = tmp_path / "c.msgpack"
    save(other, {"step": torch.tensor(1200), "params": {"w": torch.zeros(4, 9)}})
    assert main(["diff", str(files_ab[0]), str(other)]) == 1
    out = capsys.readouterr().out
    assert "params/b: only in" in out and "params/w: float32(4, 8) vs float32(4, 9)" in out and "opt/0: only in" in out


def test_verify_exit_codes(files_ab, capsys) -> None:
    assert main(["verify", str(files_ab[0])]) == 0
    data = bytearray(files_ab[0].read_bytes())
    data[200] ^= 1
    files_ab[0].write_bytes(bytes(data))
    assert main(["verify", str(files_ab[0])]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    assert main(["verify", str(files_ab[0]) + ".missing"]) == 1


def test_module_entry_point_runs(files_ab) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    good = subprocess.run([sys.executable, "-m", "functrain.cli", "verify", str(files_ab[1])], env=env,
                          capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.startswith("OK")
    files_ab[1].write_bytes(b"not a checkpoint")
    bad = subprocess.run([sys.executable, "-m", "functrain.cli", "inspect", str(files_ab[1])], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a functrain checkpoint" in bad.stderr
