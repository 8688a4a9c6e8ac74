"""scripts/bench.py runs from the command line and writes the figures README's table is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
        assert len(r["times_ms"]) == 1 and r["step_ms"] == pytest.approx(r["times_ms"][0])
        floor = rows[(block, "nope/sdpa/32")]["step_ms"]
        assert r["x_floor"] == pytest.approx(r["step_ms"] / floor)
        assert r["tokens_per_s"] == pytest.approx(2 * block / r["step_ms"] * 1e3)
    nano = result["nanogpt"]
    assert (nano["dpb"]["resolved"], nano["learned"]["resolved"]) == ("eager", "sdpa")
    assert nano["dpb_over_learned"] == pytest.approx(nano["dpb"]["ms_per_iter"] / nano["learned"]["ms_per_iter"])
