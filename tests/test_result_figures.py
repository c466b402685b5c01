"""One record of a result's figures (issue 16, item 7).

The SR builders' summary, the job's outcome, the console's rows and the shadow runs
each declared the same figures by hand, and the pipeline, the job recorder and the
console copied them field by field (a figure the copy forgot, such as the threshold on
the study list, was silently absent). Now `headscreen.figures.ResultFigures` declares
them once, the others derive from it, and `figures_of` is the one copy, to and from the
database.
"""

from __future__ import annotations

import dataclasses
import inspect

from sqlalchemy.orm import Session

from db_factories import at, claimed_job, sc_object, sr_object
from headscreen.daemon.pipeline import Timer, _outcome
from headscreen.daemon.web.actions import jsonable
from headscreen.db import api, types
from headscreen.db.models import RESULT_FIGURES, SHADOW_FIGURES, Result, ShadowResult
from headscreen.export import model
from headscreen.export.model import AlgorithmInfo, ResultSummary
from headscreen.figures import FIGURES, ResultFigures, figures_of

ALGORITHM = AlgorithmInfo(name="ct-fanogan", version="1.0.0", family="f-AnoGAN 3D", sha256="ab" * 32)

# Every figure set to a value no default has, so a figure a copy drops shows.
SCREENED = {
    "eligible": True,
    "ineligible_reason": None,  # must be None for an eligible result
    "anomaly_score": 2.375,
    "percentile": 98.5,
    "screen_positive": True,
    "threshold": 1.875,
    "predicted_age": 71.25,
    "chronological_age": 64.0,
    "age_gap": 7.25,
    "age_offset": 4.5,
    "qc_reasons": ["slice_gap_irregular", "chronological_age_missing"],
    "qc_metrics": {"brain_volume_ml": 1180.5, "noise_sigma": 3.25},
    "selected_series_uid": "2.25.4242",
}
NOT_ELIGIBLE = {**{name: None for name in FIGURES}, "eligible": False,
                "ineligible_reason": "noise_high: noise_sigma 49 outside [0, 25]",
                "qc_reasons": ["noise_high: noise_sigma 49 outside [0, 25]"], "qc_metrics": {"noise_sigma": 49.0},
                "selected_series_uid": "2.25.4343"}

RECORDS = (model.ResultSummary, types.JobOutcome, types.ResultSummaryRow, types.StudyRow,
           types.ShadowOutcome, types.ShadowResultRow)


def test_the_figures_are_declared_once_and_every_result_record_derives_from_them() -> None:
    assert set(SCREENED) == set(FIGURES) and len(FIGURES) == 13
    for record in RECORDS:
        assert issubclass(record, ResultFigures), record.__name__
        assert not set(inspect.get_annotations(record)) & set(FIGURES), f"{record.__name__} redeclares a figure"
    # No other record of the layers that hold results declares most of them again.
    for module in (model, types):
        for name, cls in vars(module).items():
            if dataclasses.is_dataclass(cls) and cls is not ResultFigures:
                own = set(inspect.get_annotations(cls)) & set(FIGURES)
                assert len(own) <= len(FIGURES) // 2, f"{module.__name__}.{name} declares {sorted(own)}"


def test_the_tables_store_every_figure_through_one_mapping() -> None:
    assert RESULT_FIGURES == FIGURES
    assert set(Result.__table__.columns.keys()) >= set(FIGURES)
    # A shadow run keeps no QC metrics and no selected series; every other figure.
    assert set(FIGURES) - set(SHADOW_FIGURES) == {"qc_metrics", "selected_series_uid"}
    assert set(ShadowResult.__table__.columns.keys()) >= set(SHADOW_FIGURES)


def test_figures_of_copies_and_refuses_a_name_that_is_not_a_figure() -> None:
    summary = ResultSummary(**SCREENED, modality="CT", algorithm=ALGORITHM)
    copied = summary.figures()
    assert copied == SCREENED
    copied["qc_reasons"].append("x")
    copied["qc_metrics"]["x"] = 1.0
    assert summary.qc_reasons == SCREENED["qc_reasons"] and summary.qc_metrics == SCREENED["qc_metrics"]
    try:
        figures_of(summary, ("modality",))
    except ValueError as exc:
        assert "modality" in str(exc)
    else:
        raise AssertionError("figures_of read a field that is not a figure")


def _round_trip(session: Session, figures: dict[str, object]) -> None:
    """SR summary -> pipeline outcome -> results row -> console and API rows -> SR summary."""
    summary = ResultSummary(**figures, modality="CT", algorithm=ALGORITHM,  # type: ignore[arg-type]
                            ineligible_reasons=() if figures["eligible"] else (str(figures["ineligible_reason"]),))
    outcome = _outcome(summary, [{"series_uid": "2.25.1", "accepted": True}], Timer({"infer": 0.5}),
                       [sc_object(), sr_object()])
    assert outcome.figures() == figures
    ticket = claimed_job(session, now=at(0))
    result_id = api.finish_job(session, ticket.job_id, "w1", outcome, ["PACS"], now=at(3700))
    assert result_id is not None

    detail = api.get_study(session, ticket.study_instance_uid)
    assert detail is not None
    (stored,) = detail.results
    assert stored.result_id == result_id and stored.figures() == figures
    assert detail.row.result_id == result_id and detail.row.figures() == figures
    (listed,) = [r for r in api.list_studies(session) if r.study_instance_uid == ticket.study_instance_uid]
    assert listed.figures() == figures
    # The REST API's JSON carries each figure under its own name.
    for row in (stored, listed):
        body = jsonable(row)
        assert {name: body[name] for name in FIGURES} == figures
    # The console's row rebuilds the summary the SR was built from, figure for figure.
    again = ResultSummary(**listed.figures(), modality="CT", algorithm=ALGORITHM,
                          ineligible_reasons=summary.ineligible_reasons)
    assert again == summary

    shadow = types.ShadowOutcome(bundle_name="ct-shadow", bundle_version="2.0.0",
                                 **figures_of(outcome, SHADOW_FIGURES))  # type: ignore[arg-type]
    assert api.record_shadow_result(session, result_id, shadow, now=at(3701)) is not None
    (shadow_row,) = api.shadow_results_of_study(session, detail.row.study_id)
    assert figures_of(shadow_row, SHADOW_FIGURES) == figures_of(summary, SHADOW_FIGURES)


def test_every_figure_survives_outcome_database_console_and_back(db_session: Session) -> None:
    _round_trip(db_session, SCREENED)


def test_a_not_eligible_result_survives_the_round_trip_too(db_session: Session) -> None:
    _round_trip(db_session, NOT_ELIGIBLE)


def test_a_study_without_a_result_has_no_figures(db_session: Session) -> None:
    ticket = claimed_job(db_session, now=at(0))
    detail = api.get_study(db_session, ticket.study_instance_uid)
    assert detail is not None and detail.results == []
    assert detail.row.figures() == ResultFigures().figures()
    assert detail.row.eligible is None


def test_a_summary_or_outcome_needs_a_verdict() -> None:
    for build in (lambda: ResultSummary(modality="CT", algorithm=ALGORITHM),
                  lambda: types.JobOutcome(series_verdicts=[], timings={}, objects=[])):
        try:
            build()
        except ValueError as exc:
            assert "eligible" in str(exc)
        else:
            raise AssertionError("a result without eligible was accepted")

