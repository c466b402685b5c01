"""The figures of one screening result, declared once.

The SR builders (`export.model.ResultSummary`), the job's outcome the worker records
(`db.types.JobOutcome`), the console's rows (`db.types.ResultSummaryRow`,
`db.types.StudyRow`) and the shadow runs (`db.types.ShadowOutcome`,
`db.types.ShadowResultRow`) are all `ResultFigures` plus what each adds, so a figure
added here reaches each of them, and `figures_of` is the one copy between them and
the database rows (`db.models.Result`, `db.models.ShadowResult`).

The fields are keyword-only: subclasses add positional fields of their own after them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["FIGURES", "ResultFigures", "figures_of"]


@dataclass(frozen=True, kw_only=True)
class ResultFigures:
    """What screening found. ``None`` for a number means absent (never zero or normal).

    ``eligible`` is None only where there is no verdict: a study with no result yet, a
    shadow run that failed. A result that was screened or refused always says which.
    """

    eligible: bool | None = None
    ineligible_reason: str | None = None
    anomaly_score: float | None = None
    percentile: float | None = None
    screen_positive: bool | None = None
    threshold: float | None = None
    predicted_age: float | None = None
    chronological_age: float | None = None
    age_gap: float | None = None
    # Years the scanner's site reference took off the model's brain age (its median gap on
    # confirmed-normal studies, daemon.reference); predicted_age and age_gap are after it.
    # None: no correction. The model's own estimate is predicted_age + age_offset.
    age_offset: float | None = None
    qc_reasons: list[str] = field(default_factory=list)
    qc_metrics: dict[str, float] = field(default_factory=dict)
    selected_series_uid: str | None = None

    def figures(self) -> dict[str, Any]:
        """The figures alone, as keyword arguments for another record or a table row."""
        return figures_of(self)


#: The figures' names, in declaration order.
FIGURES: tuple[str, ...] = tuple(f.name for f in fields(ResultFigures))


def figures_of(source: object, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The figures ``names`` (default all) read from any object that has them as attributes
    (a `ResultFigures`, a database row), as keyword arguments. Lists and dicts are copied,
    so the new record shares no mutable value with the source."""
    out: dict[str, Any] = {}
    for name in FIGURES if names is None else names:
        if name not in FIGURES:
            raise ValueError(f"figures_of: {name!r} is not a result figure")
        value = getattr(source, name)
        out[name] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
    return out
