"""How a suite names a task: a name plus, for ``file:``/``hub:`` tasks, its columns and kind."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer


class TaskEntry(BaseModel):
    """A task; ``file:``/``hub:`` tasks name their columns (``text_columns: [text]``, ``label_column: label``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    kind: Literal["classification", "generation"] | None = Field(None, description="file:/hub: tasks (default classification)")
    drop_invalid: bool | None = Field(None, description="file:/hub: tasks: drop rows without text or label "
                                                        "(with a warning) instead of refusing them")

    @field_validator("text_columns", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _added_only_when_set(self, handler):
        """``drop_invalid`` came later: unset, it stays out of dumps, so trial ids and suite hashes keep theirs."""
        data = handler(self)
        if data.get("drop_invalid") is None:
            data.pop("drop_invalid", None)
        return data

    def options(self) -> dict:
        """The keyword options ``get_task`` takes for this entry."""
        return {"text_columns": list(self.text_columns) if self.text_columns else None,
                "label_column": self.label_column, "kind": self.kind, "drop_invalid": self.drop_invalid}
