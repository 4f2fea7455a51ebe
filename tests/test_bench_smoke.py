"""The step-time benchmark script runs (smoke mode: tiny backbone, 2 steps) and checks parity."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_smoke(tmp_path):
    out = tmp_path / "s.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    for row in ("floor", "lora", "houlsby", "prefix", "prompt"):
        assert re.search(rf"^\| `{re.escape(row)}` ", text, re.M), row
    deltas = [float(x) for x in re.findall(r"max \|Δ logits\| = ([0-9.eE+-]+)", text)]
    assert len(deltas) == 5  # peft's lora, prefix, ptuning_v2, prompt, ptuning with our weights
    assert deltas and all(d <= 1e-5 for d in deltas), deltas
