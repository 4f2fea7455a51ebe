"""Run options: how this process runs trials, never what a trial is.

Device, CPU threads, whether weights are saved and whether progress is shown change where
and how fast a trial runs, not its numbers' meaning; they never enter a ``TrialSpec`` or a
trial id. A ``RunOptions`` is built once per run (``from_suite``) and frozen; an executor that
runs trials elsewhere (a Ray worker) builds its own once, from this one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps (as resolve_device takes it)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of a trial (None: leave as set)")
    save_weights: bool = Field(True, description="save each trial's adapter weights in its artifacts folder")
    quiet: bool = Field(False, description="no progress bars or per-trial lines")

    @classmethod
    def from_suite(cls, suite, quiet: bool = False, device: str | None = None) -> "RunOptions":
        """The suite's ``training`` run options; ``device`` replaces its device (a pinned GPU)."""
        training = suite.training
        return cls(device=device or training.device, threads=training.threads, save_weights=training.save_weights,
                   quiet=quiet)
