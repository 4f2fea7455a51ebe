"""One trial on several processes: ``torchrun --nproc_per_node 2 -m peftbench run`` on CPU (gloo).

Both ranks train every trial (DDP), in the same order; only rank 0 writes the suite folder,
the store, the artifacts and the report, so each trial has one row, not two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_runner import base_args, env, rows  # noqa: F401 - env is a fixture


def torchrun(argv: list[str], cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "peftbench", "run", *argv]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=240)


def test_torchrun_two_ranks_write_one_row_and_one_report(env, tmp_path):
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "lora", "--budget", "5%", "--seeds", "1", "--suite", "ddp", "--device", "cpu")
    proc = torchrun(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("suite ddp: 1 done") == 1  # rank 0 alone reports
    found = rows(out, "ddp")
    assert [r.spec.method for r in found] == ["lora"]
    for r in found:
        assert r.status == "done" and r.attempts == 1, r.error
        assert r.result.environment["world_size"] == 2  # trained by both ranks ...
        assert r.result.steps == 3  # ... on halves of the suite's batch: the same steps as one process
        assert (out / "ddp" / "trials" / r.trial_id / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "ddp" / "trials").iterdir()) == sorted(r.trial_id for r in found)
    assert [p.name for p in (out / "ddp").glob("report*.md")] == ["report.md"]
    assert len(json.loads((out / "ddp" / "suite.json").read_text())["runs"]) == 1

