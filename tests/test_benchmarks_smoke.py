"""The benchmark suite runs end to end on tiny sizes and writes well-formed results (no timing asserts)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["mlp", "transformer", "convbn"]
CONTENDERS = ["torch eager AdamW", "torch eager AdamW foreach", "torch eager AdamW fused", "torch.compile model+step",
              "functrain eager", "functrain jit", "functrain jit donated"]


@pytest.mark.slow
@pytest.mark.compile
def test_tiny_benchmark_writes_markdown_and_json_for_every_model_and_contender(tmp_path):
    out, js = tmp_path / "performance.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_steps.py"), "--tiny",
         "--out", str(out), "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(js.read_text())
    text = out.read_text()
    assert sorted(results["models"]) == sorted(MODELS)
    for model in MODELS:
        r = results["models"][model]
        assert r["best_imperative"] in CONTENDERS[:4]
        assert list(r["contenders"]) == CONTENDERS
        best = r["contenders"][r["best_imperative"]]
        assert best["ratio_vs_best_imperative"] == pytest.approx(1.0)
        assert best["memory_ratio_vs_best_imperative"] == pytest.approx(1.0)
        for name, c in r["contenders"].items():
            assert c["steps_per_s"] > 0 and c["ratio_vs_best_imperative"] > 0 and c["peak_bytes"] > 0, (model, name)
            assert (c["compile_s"] is not None) == ("jit" in name or "compile" in name), (model, name)
            assert f"| {name} |" in text
        assert f"## {model} " in text
    pop = results["models"]["mlp"]["population"]
    assert pop["members"] == 8 and pop["throughput_ratio_vs_sequential"] > 0
    assert "## Compile start-up" in text
