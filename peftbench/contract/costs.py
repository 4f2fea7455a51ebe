"""A method's own cost figures (4-bit weight bytes ...), shown by the report as extra columns."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

UNITS = ("bytes", "params", "seconds", "ratio", "count")


class Cost(BaseModel):
    """One figure and its unit; the report formats it by unit (``bytes`` as KiB/MiB ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: float
    unit: Literal["bytes", "params", "seconds", "ratio", "count"]
