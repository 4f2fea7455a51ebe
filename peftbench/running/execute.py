"""One trial, never raising for the trial's own errors: ``execute_trial(spec, options, artifacts, registry)``
(and, for a search trial, ``pruning``: its group's study, so Optuna's pruner may stop it).

Whatever runs a trial (this process, a Ray worker, every rank under torchrun) calls this and
gets an ``Outcome`` back: ``done`` with a ``TrialResult``, ``diverged`` with what the trial got
before its loss became non-finite, or ``failed`` with the error in one line (the traceback
goes to ``error.txt`` in the trial's artifacts). Artifacts go to a local folder or an fsspec
URL; for a URL the trial writes to a temporary folder that is uploaded when it ends.
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peftbench.results.records import TrialRecord, TrialResult, TrialSpec
from peftbench.running.artifacts import is_remote, upload, write_text
from peftbench.running.options import RunOptions
from peftbench.running.search import Pruning


@dataclass(frozen=True)
class Outcome:
    """What running a trial gave: its status, the error (one line) and the result so far."""

    status: Literal["done", "failed", "diverged"]
    error: str | None = None
    result: TrialResult | None = None


def _run(spec: TrialSpec, options: RunOptions, artifacts: str | None, registry, pruning: Pruning | None,
         reuse: TrialRecord | None = None) -> Outcome:
    from peftbench.running.train import Diverged
    from peftbench.running.trial import run_trial

    try:
        if reuse is not None:  # its search trained it already: read test with the search's adapter
            from peftbench.running.reuse import evaluate_reused

            return Outcome("done", None, evaluate_reused(spec, reuse, options, artifacts, registry))
        return Outcome("done", None, run_trial(spec, options, artifacts, registry, pruning))
    except Diverged as exc:
        return Outcome("diverged", str(exc), exc.result)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded and the grid goes on
        tb = traceback.format_exc()
        if artifacts:
            write_text(artifacts, "error.txt", tb)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome("failed", f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})",
                       TrialResult(artifacts=artifacts) if artifacts else None)


def execute_trial(spec: TrialSpec, options: RunOptions, artifacts: str | None, registry,
                  pruning: Pruning | None = None, reuse: TrialRecord | None = None) -> Outcome:
    """Run one trial and say how it went; ``artifacts``: its folder or URL (None: keep nothing);
    ``reuse``: the search trial that trained it already (``running.reuse``)."""
    if not is_remote(artifacts):
        return _run(spec, options, artifacts, registry, pruning, reuse)
    with tempfile.TemporaryDirectory(prefix="peftbench-trial-") as tmp:
        local = str(Path(tmp) / "trial")
        outcome = _run(spec, options, local, registry, pruning, reuse)
        result = (outcome.result or TrialResult()).model_copy(update={"artifacts": artifacts})
        status, error = outcome.status, outcome.error
        try:
            if Path(local).is_dir():
                upload(Path(local), artifacts)
        except Exception as exc:  # noqa: BLE001
            status = "failed"
            error = "; ".join(filter(None, [error, f"uploading the artifacts to {artifacts} failed: "
                                                   f"{type(exc).__name__}: {exc}"]))
    return Outcome(status, error, result)
