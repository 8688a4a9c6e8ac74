"""scripts/bench.py runs from the command line and writes the figures README's table is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynpos.model.attention import choose_attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_grid_and_nanogpt_rows(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--presets", "micro", "--blocks", "32", "96",
           "--schemes", "dpb", "nope", "--paths", "auto", "--batch", "2", "--reps", "1", "--no-xt",
           "--threads", "1", "--nanogpt", "--nanogpt-iters", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    rows = {(r["block"], r["label"]): r for r in result["train"]}
    # the references, then DPB on auto: eager up to 64 positions, fused beyond (nope/auto is the
    # floor's configuration, measured once)
    assert set(rows) == {(b, label) for b in (32, 96) for label in ("nope/sdpa/32", "learned/sdpa/32")} | {
        (32, "dpb/auto->eager/32"), (96, "dpb/auto->fused/32")}
    for (block, label), r in rows.items():
        assert len(r["times_ms"]) == 1 and r["batch"] == 2 and r["mode"] == "eager"
        # the path the script reports is the one choose_attention decides for these settings
        bias, learned = {"dpb": ("table", True), "nope": ("none", False), "learned": ("none", True)}[r["scheme"]]
        want = choose_attention(r["path"], bias=bias, learned=learned, device="cpu", grad=True, cached=False,
                                dropout=0.0, length=block).path
        assert r["resolved"] == want
    nano = result["nanogpt"]
    assert (nano["dpb"]["resolved"], nano["learned"]["resolved"]) == ("eager", "sdpa")


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    """The prepared device check, at toy sizes on the CPU with a quick compile backend: every
    path agrees with the float64 reference, and every grid and GPT-2 row ran (none skipped)."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny", "--reps", "1",
           "--backend", "aot_eager", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == []
    checked = {(r["path"], r["dtype"], r["grads"]) for r in result["paths"]}
    assert {("fused", "float32", True), ("sdpa", "bfloat16", True), ("eager", "float32", True)} <= checked
    assert all(r["ok"] for r in result["paths"])
    grid = {(r["scheme"], r["block"], r["compiled"]): r for r in result["grid"]}
    assert set(grid) == {(s, 32, c) for s in ("nope", "dpb", "alibi", "rope") for c in (False, True)}
    # the grid trains DPB on the path choose_attention gives: eager up to 64 positions on the CPU
    assert grid[("dpb", 32, False)]["path"] == grid[("dpb", 32, True)]["path"] == "eager"
    assert set(result["gpt2"]) == {"learned", "dpb", "dpb_over_learned_tokens"}
