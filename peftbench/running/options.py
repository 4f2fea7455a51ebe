"""Run options: how this process runs trials, never what a trial is.

Device, CPU threads, whether weights are saved, whether progress is shown and which trackers
log it change where and how fast a trial runs and who hears of it, not its numbers' meaning;
they never enter a ``TrialSpec`` or a trial id. A ``RunOptions`` is built once per run
(``from_suite``) and frozen; an executor that runs trials elsewhere (a Ray worker) builds its
own once, from this one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps (as resolve_device takes it)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of a trial (None: leave as set)")
    save_weights: bool = Field(True, description="save each trial's adapter weights in its artifacts folder")
    quiet: bool = Field(False, description="no progress bars or per-trial lines")
    report_to: tuple[str, ...] = Field((), description="trackers each trial logs to (running.trackers)")
    tracker_dir: str | None = Field(None, description="the suite folder, absolute: wandb's files go there")
    mlflow_uri: str | None = Field(None, description="MLflow's store: MLFLOW_TRACKING_URI, else <suite>/mlruns")

    @classmethod
    def from_suite(cls, suite, quiet: bool = False, device: str | None = None) -> "RunOptions":
        """The suite's ``training`` run options; ``device`` replaces its device (a pinned GPU)."""
        from peftbench.running.trackers import tracker_options

        training = suite.training
        trackers = tracker_options(training.report_to, Path(suite.out) / (suite.suite or ""))
        return cls(device=device or training.device, threads=training.threads, save_weights=training.save_weights,
                   quiet=quiet, **trackers)
