"""The shell benchmark runs end to end on tiny sizes and writes well-formed results (no timing asserts)."""

import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_shell", os.path.join(ROOT, "benchmarks", "bench_shell.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_shell"] = module  # torch.compile looks the module of the traced functions up by name
    spec.loader.exec_module(module)
    return module


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.compile
def test_tiny_shell_benchmark_writes_json_and_markdown(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "shell.json"
    returned = bench.main(["--tiny", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["tiny"] is True and results["log_every"] == 20
    assert results["train_overhead"], "no train() measurement"
    for name, r in results["train_overhead"].items():
        assert r["rounds"] == len(r["ratios"]) == 2 and r["steps"] == 40, name
        for key in ("ratio_median", "cpu_ratio_median", "shell_ratio_median", "bare_s_median", "train_s_median",
                    "bare_us_per_step"):
            assert _positive(r[key]), (name, key, r[key])
        assert all(_positive(x) for x in r["ratios"]) and r["target"] == pytest.approx(1.02)
        assert math.isfinite(r["overhead_us_per_step"]) and math.isfinite(r["shell_us_per_step_median"])
        assert len(r["shell_ratios"]) == len(r["cpu_ratios"]) == 2
    a = results["async_checkpoint"]
    assert a["rounds"] == len(a["ratios"]) == len(a["copy_ratios"]) and a["state_mb"] > 0
    for key in ("sync_s_median", "async_block_s_median", "async_copy_block_s_median", "ratio_median",
                "copy_ratio_median"):
        assert _positive(a[key]), (key, a[key])
    assert a["target"] == pytest.approx(0.10)
    text = bench.markdown_section(results)
    assert text.startswith("## Shell overhead\n")
    assert text.count("| train() vs bare loop") == len(results["train_overhead"])
    assert "| async save blocking vs sync save" in text and "copy=True" in text
