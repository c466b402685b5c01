"""Site calibration pieces: the threshold and outlier rules, scanner keys, the reference
choice, site references in the database (SQLite and PostgreSQL), the SR and overlay
legend of a calibrating or site-referenced result, `headscreen calibrate`, the config
and the console. The whole path on phantom studies is tests/test_site_calibration.py."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from db_factories import T0, add_series, outcome, uid
from headscreen.bundle import load_bundle
from headscreen.daemon.cli import main
from headscreen.daemon.config import load_settings, shipped_bundles
from headscreen.daemon.reference import (
    AGE_BIAS_MIN_STUDIES,
    Calibrating,
    Reference,
    ReferencePolicy,
    estimate,
    estimate_age_bias,
    group_key,
    robust_cut,
    scoring_identity,
    station_key,
    station_views,
    threshold_at_specificity,
)
from headscreen.db import api
from headscreen.db.models import AuditEvent
from headscreen.db.types import BundleRef, CalibrationCandidate
from headscreen.errors import ConfigError
from headscreen.export import codes
from headscreen.export.sc import _legend_lines, build_overlay_series
from headscreen.export.sr import ReferenceNote, build_report
from serve_harness import dciodvfy_errors
from sr_helpers import coded_evaluations, errors_and_warnings, measurement_group, pixelmed_findings, sr_texts
from test_export import MR_SUMMARY, ct_summary, make_ct_series

STATION = "ACME|HEADSCAN 9|CT-WEST"


@pytest.fixture(scope="module")
def ct_bundle():
    return next(b for b in (load_bundle(p) for p in shipped_bundles()) if b.manifest.modality == "CT")


def candidate(i: int, score: float | None, *, normal: bool = True, eligible: bool = True, scoring: str = "s",
              flagged: bool = False, station: str = STATION, ages: tuple[float | None, float | None] = (None, None),
              age_offset: float | None = None) -> CalibrationCandidate:
    """`ages`: (brain age as reported, chronological age)."""
    return CalibrationCandidate(result_id=i, station_key=station, eligible=eligible, anomaly_score=score,
                                scoring_sha256=scoring, confirmed_normal=normal, flagged=flagged,
                                predicted_age=ages[0], chronological_age=ages[1], age_offset=age_offset)


def aged(n: int, bias: float, *, start: int = 1, normal: bool = True, seed: int = 0) -> list[CalibrationCandidate]:
    """n scored studies whose model brain age is the true age + `bias` + noise (sd 4 y)."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(25, 80, n)
    return [candidate(start + i, 0.4, normal=normal, ages=(float(t + bias + rng.normal(0, 4)), float(t)))
            for i, t in enumerate(true)]


# --------------------------------------------------------------------------- math

def test_threshold_rule_is_the_training_rule() -> None:
    from headscreen.model_training.calibration import threshold_at_specificity as training_rule

    rng = np.random.default_rng(3)
    for size in (1, 2, 19, 20, 21, 60, 333):
        scores = rng.normal(0.4, 0.05, size)
        for specificity in (0.5, 0.9, 0.95, 0.99):
            assert threshold_at_specificity(scores.tolist(), specificity) == training_rule(scores, specificity)
    with pytest.raises(ValueError, match="specificity"):
        threshold_at_specificity([1.0], 1.0)
    with pytest.raises(ValueError, match="scores"):
        threshold_at_specificity([], 0.95)


def test_robust_cut_is_median_plus_k_scaled_mad() -> None:
    scores = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, MAD 1
    assert robust_cut(scores, 3.0) == pytest.approx(3.0 + 3.0 * 1.4826)


def test_first_n_takes_scored_studies_and_drops_flagged_and_outliers() -> None:
    rows = [candidate(1, 0.40, normal=False), candidate(2, None, eligible=False, normal=False),
            candidate(3, 0.41, normal=False, scoring="old"), candidate(4, 0.42, normal=False),
            candidate(5, 0.90, normal=False), candidate(6, 0.39, normal=False, flagged=True),
            candidate(7, 0.43, normal=False), candidate(8, 0.41, normal=False), candidate(9, 0.44, normal=False)]
    found = estimate(rows, STATION, "s", 0.95, first_n=6, outlier_mads=3.0)
    assert found is not None and found.rule == "first_n_robust"
    # The first six scored by this manifest: 1, 4, 5, 6, 7, 8 (2 not eligible, 3 another manifest, 9 too late).
    assert found.considered == 6 and found.excluded == {"flagged_by_admin": 1, "outlier": 1}
    assert sorted(found.result_ids) == [1, 4, 7, 8]
    assert found.scores == (0.40, 0.41, 0.42, 0.43) and found.threshold == 0.43
    assert found.outlier_cut is not None and 0.43 < found.outlier_cut < 0.90


def test_confirmed_normal_rule_counts_what_it_could_not_use() -> None:
    rows = [candidate(1, 0.30), candidate(2, None, eligible=False), candidate(3, 0.31, scoring="old"),
            candidate(4, float("nan")), candidate(5, 0.90, normal=False), candidate(6, 0.32)]
    found = estimate(rows, STATION, "s", 0.95)
    assert found is not None and found.rule == "confirmed_normal"
    assert found.considered == 5 and found.n == 2 and found.result_ids == (1, 6)
    assert found.excluded == {"not_eligible": 1, "other_bundle_manifest": 1, "no_score": 1}
    assert estimate([candidate(1, 0.3, normal=False)], STATION, "s", 0.95) is None


# --------------------------------------------------------------------------- brain-age bias

def test_a_scanners_brain_age_bias_is_the_median_gap_of_its_confirmed_normal_studies() -> None:
    rows = [*aged(30, 8.0), *aged(10, 40.0, start=100, normal=False, seed=1),  # patients: not a reference
            candidate(200, 0.4, ages=(None, 50.0)), candidate(201, 0.4, ages=(60.0, None)),
            candidate(202, 0.4, scoring="old", ages=(60.0, 50.0)), candidate(203, None, eligible=False)]
    record = estimate_age_bias(rows, "s")
    gaps = [c.predicted_age - c.chronological_age for c in rows[:30]]  # type: ignore[operator]
    assert record["n"] == 30 and record["offset_years"] == pytest.approx(float(np.median(gaps)), abs=1e-3)
    assert record["applied"] is True and 4.0 < record["offset_years"] < 12.0
    low, high = record["ci95"]
    assert 0 < low <= record["offset_years"] <= high
    assert record["excluded"] == {"no_predicted_age": 1, "no_chronological_age": 1, "other_bundle_manifest": 1,
                                  "not_eligible": 1}
    assert record["min_studies"] == AGE_BIAS_MIN_STUDIES


def test_a_brain_age_already_corrected_is_estimated_from_the_models_own_age() -> None:
    # The same studies, reported after an earlier site reference's +8 y correction: the next
    # calibration must find the same bias, not none.
    first = aged(30, 8.0)
    reported = [candidate(c.result_id, 0.4, ages=(c.predicted_age - 8.0, c.chronological_age), age_offset=8.0)  # type: ignore[operator]
                for c in first]
    assert estimate_age_bias(reported, "s")["offset_years"] == pytest.approx(
        estimate_age_bias(first, "s")["offset_years"], abs=1e-9)


def test_no_brain_age_correction_from_few_studies_or_from_noise() -> None:
    few = estimate_age_bias(aged(AGE_BIAS_MIN_STUDIES - 1, 8.0), "s")
    assert few["applied"] is False and few["n"] == AGE_BIAS_MIN_STUDIES - 1
    assert few["reason"] == f"{AGE_BIAS_MIN_STUDIES - 1} studies with both ages, fewer than {AGE_BIAS_MIN_STUDIES}"
    unbiased = estimate_age_bias(aged(40, 0.0, seed=2), "s")
    assert unbiased["applied"] is False and unbiased["ci95"][0] < 0 < unbiased["ci95"][1]
    assert "holds 0: no bias to correct" in unbiased["reason"]
    assert estimate_age_bias(aged(10, 8.0), "s", min_studies=10)["applied"] is True  # [calibration] age_min_studies
    none = estimate_age_bias([candidate(1, 0.4)], "s")
    assert none == {**none, "n": 0, "applied": False, "reason": "no study confirmed normal with both ages"}
    assert "offset_years" not in none


def test_a_site_reference_keeps_the_brain_age_bias_only_for_an_age_bundle() -> None:
    rows = aged(25, 6.0)
    with_age = estimate(rows, STATION, "s", 0.95, with_age=True)
    assert with_age is not None and with_age.brain_age == estimate_age_bias(rows, "s")
    assert with_age.provenance("station", _FakeBundle(), 3.0)["brain_age"] == with_age.brain_age
    without = estimate(rows, STATION, "s", 0.95)
    assert without is not None and without.brain_age is None
    assert "brain_age" not in without.provenance("station", _FakeBundle(), 3.0)


class _FakeBundle:
    """What Estimate.provenance reads of a bundle."""

    class manifest:  # noqa: N801 (mirrors Bundle.manifest)
        key = "mr-test-1"

        class calibration:  # noqa: N801
            reference_scores = [0.1, 0.2]
            threshold = 0.2


def test_a_site_reference_with_a_bias_corrects_brain_age_and_says_so(ct_bundle) -> None:
    bias = {"applied": True, "offset_years": 7.96, "ci95": [5.3, 11.7], "n": 31}
    row = dataclasses.replace(_site_row(25), provenance={"rule": "confirmed_normal", "brain_age": bias})
    reference = Reference.from_site(row)
    assert reference.age_offset == 7.96
    note = "brain age corrected by -8.0 y, this scanner's median gap on 31 confirmed-normal studies"
    assert reference.describe().endswith("; " + note)
    assert reference.legend() == "Reference: site, this scanner, n=25, created 2026-01-05"  # its age line says it
    unapplied = dataclasses.replace(row, provenance={"brain_age": {**bias, "applied": False, "reason": "few"}})
    assert Reference.from_site(unapplied).age_offset is None
    assert "brain age" not in Reference.from_site(unapplied).describe()
    assert Reference.from_bundle(ct_bundle).age_offset is None


def test_the_brain_age_of_a_result_is_corrected_by_its_site_reference_only() -> None:
    from headscreen.daemon.pipeline import _screened
    from headscreen.inference import Inference

    inference = Inference(anomaly_score=0.5, terms={}, percentile=90.0, screen_positive=False, threshold=0.6,
                          predicted_age=60.0, chronological_age=50.0, age_gap=10.0,
                          error_map=np.zeros((2, 2, 2), np.float32))
    bias = {"applied": True, "offset_years": 8.0, "ci95": [5.0, 11.0], "n": 30}
    site = Reference.from_site(dataclasses.replace(_site_row(25), provenance={"brain_age": bias}))
    corrected = _screened(inference, site, [])
    assert (corrected.predicted_age, corrected.age_gap, corrected.age_offset) == (52.0, 2.0, 8.0)
    assert corrected.anomaly_score == 0.5  # the score keeps the model's own gap, as its reference did
    for reference in (Reference.from_site(_site_row(25)), Calibrating(station=STATION, needed=20, has=3)):
        plain = _screened(inference, reference, [])
        assert (plain.predicted_age, plain.age_gap, plain.age_offset) == (60.0, 10.0, None)
    no_age = dataclasses.replace(inference, chronological_age=None, age_gap=None)
    assert _screened(no_age, site, []).age_gap is None and _screened(no_age, site, []).predicted_age == 52.0
    implausible = dataclasses.replace(inference, predicted_age=None, age_gap=None)
    assert _screened(implausible, site, []).age_offset is None


# --------------------------------------------------------------------------- scanners and choice

def test_station_key_is_normalised_from_the_header() -> None:
    header = Dataset()
    header.Manufacturer = "  Siemens  Healthineers "
    header.ManufacturerModelName = "SOMATOM|go.Top"
    header.StationName = "ct-würzburg 2"
    assert station_key(header) == "SIEMENS HEALTHINEERS|SOMATOM GO.TOP|CT-WURZBURG 2"
    assert station_key(Dataset()) == "UNKNOWN|UNKNOWN|UNKNOWN"
    assert group_key(STATION, "station") == STATION and group_key(STATION, "model") == "ACME|HEADSCAN 9"
    with pytest.raises(ValueError, match="grouping"):
        group_key(STATION, "site")


def test_bundle_reference_judges_as_the_bundle_does(ct_bundle) -> None:
    reference = Reference.from_bundle(ct_bundle)
    calibration = ct_bundle.manifest.calibration
    for score in [*calibration.reference_scores, calibration.threshold + 1e-6, 0.0, 10.0]:
        assert reference.percentile(score) == ct_bundle.percentile(score)
        assert reference.positive(score) == ct_bundle.screen_positive(score)
    assert reference.describe() == (f"Reference: bundle {ct_bundle.manifest.key}, synthetic healthy phantoms, "
                                    f"n={len(calibration.reference_scores)}")


def _site_row(n: int, threshold: float = 0.5, reference_id: int = 7, station: str = STATION) -> api.SiteReferenceRow:
    return api.SiteReferenceRow(
        reference_id=reference_id, bundle_name="b", bundle_version="1", scoring_sha256="s", grouping="station",
        station=station, rule="confirmed_normal", scores=[0.4] * (n - 1) + [threshold], n=n, threshold=threshold,
        specificity=0.95, provenance={"rule": "confirmed_normal"}, result_ids=list(range(n)), created_at=T0,
        created_by="alice", retired_at=None, retired_by=None, retire_reason=None)


def test_policy_bundle_mode_site_mode_and_calibrating(ct_bundle) -> None:
    assert ReferencePolicy().choose(ct_bundle, STATION).source == "bundle"
    seen = []

    def lookup(*key: str):
        seen.append(key)
        return rows.get(key[-1])

    rows: dict[str, api.SiteReferenceRow] = {}
    site = ReferencePolicy(mode="site", min_references=20, lookup=lookup)
    missing = site.choose(ct_bundle, STATION)
    assert isinstance(missing, Calibrating) and (missing.needed, missing.has) == (20, 0)
    assert missing.describe() == ("Calibrating: no screen result until this scanner has 20 healthy reference "
                                  "studies (has 0)")
    assert seen[-1] == (ct_bundle.manifest.name, ct_bundle.manifest.version, scoring_identity(ct_bundle),
                        "station", STATION)
    rows[STATION] = _site_row(12)
    few = site.choose(ct_bundle, STATION)
    assert isinstance(few, Calibrating) and few.has == 12
    rows[STATION] = _site_row(25, threshold=0.47)
    used = site.choose(ct_bundle, STATION)
    assert isinstance(used, Reference) and used.source == "site" and used.threshold == 0.47
    assert used.describe() == f"Reference: site, station {STATION}, n=25, created 2026-01-05"
    assert "this scanner" in used.legend() and STATION not in used.legend()
    by_model = ReferencePolicy(mode="site", grouping="model", lookup=lookup).choose(ct_bundle, STATION)
    assert isinstance(by_model, Calibrating) and seen[-1][-2:] == ("model", "ACME|HEADSCAN 9")
    with pytest.raises(ValueError, match="lookup"):
        ReferencePolicy(mode="site")


# --------------------------------------------------------------------------- database

def _new(station: str = STATION, scores: list[float] | None = None, scoring: str = "s" * 64) -> api.NewSiteReference:
    scores = scores or [0.40, 0.41, 0.45]
    return api.NewSiteReference(
        bundle_name="ct-x", bundle_version="1.0", scoring_sha256=scoring, grouping="station", station=station,
        rule="confirmed_normal", scores=scores, threshold=threshold_at_specificity(scores, 0.95), specificity=0.95,
        provenance={"rule": "confirmed_normal", "used": len(scores), "excluded": {"not_eligible": 1}},
        result_ids=list(range(1, len(scores) + 1)))


def test_site_references_are_created_chosen_newest_and_retired_audited(db_session) -> None:
    first = api.create_site_reference(db_session, _new(), "alice", now=T0)
    second = api.create_site_reference(db_session, _new(scores=[0.5, 0.6]), "bob", now=T0 + timedelta(days=1))
    api.create_site_reference(db_session, _new(station="OTHER|X|Y"), "alice", now=T0)
    assert first.provenance["created_by"] == "alice" and first.n == 3 and first.scores == [0.40, 0.41, 0.45]

    def active(scoring: str = "s" * 64, station: str = STATION):
        return api.active_site_reference(db_session, "ct-x", "1.0", scoring, "station", station)

    assert active().reference_id == second.reference_id
    assert active(scoring="t" * 64) is None
    retired = api.retire_site_reference(db_session, second.reference_id, "carol", "drifted after a tube change",
                                        now=T0 + timedelta(days=2))
    assert retired.retired_by == "carol" and not retired.active
    assert active().reference_id == first.reference_id  # the next newest is used again
    with pytest.raises(api.ReferenceNotFound):
        api.retire_site_reference(db_session, second.reference_id, "carol", "again")
    with pytest.raises(ValueError, match="reason"):
        api.retire_site_reference(db_session, first.reference_id, "carol", "  ")
    listed = api.list_site_references(db_session)
    assert [r.reference_id for r in listed][0] > first.reference_id and len(listed) == 3
    assert len(api.list_site_references(db_session, include_retired=False)) == 2
    actions = [e.action for e in db_session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
    assert actions.count("site_reference_created") == 3 and actions.count("site_reference_retired") == 1


def _scored(session, ref: BundleRef, score: float | None, station: str = STATION, normal: bool = False,
            kind: str = "bundle", scoring: str = "s" * 64, now=T0,
            ages: tuple[float | None, float | None] = (None, None), age_offset: float | None = None) -> str:
    """A study through the queue to a result that names its scanner; confirmed normal if asked.
    `ages`: (brain age as reported, chronological age)."""
    study = uid()
    add_series(session, study, 3, now=now, modality=ref.modality)
    api.sweep_completeness(session, now + timedelta(hours=1), 60, 10, [ref])
    ticket = api.claim_job(session, "w1", 600, now + timedelta(hours=1))
    assert ticket is not None and ticket.study_instance_uid == study
    result = outcome(anomaly_score=score, eligible=score is not None,
                     ineligible_reason=None if score is not None else "noise_high: test",
                     percentile=None, screen_positive=None, threshold=None, station_key=station,
                     scoring_sha256=scoring if score is not None else None, reference_kind=kind if score else None,
                     predicted_age=ages[0], chronological_age=ages[1], age_offset=age_offset,
                     age_gap=None if None in ages else ages[0] - ages[1])  # type: ignore[operator]
    assert api.finish_job(session, ticket.job_id, "w1", result, [], now + timedelta(hours=1, seconds=5))
    if normal:
        api.set_review(session, study, True, True, "alice")
    return study


def test_results_record_scanner_manifest_and_reference_and_are_counted(db_session) -> None:
    ref = BundleRef("ct-x", "1.0", "CT")
    study = _scored(db_session, ref, 0.42, normal=True, kind="calibrating")
    _scored(db_session, ref, 0.44)
    _scored(db_session, ref, None, station="ACME|HEADSCAN 9|CT-EAST")
    detail = api.get_study(db_session, study)
    assert detail is not None
    [current] = detail.results
    assert (current.station_key, current.reference_kind) == (STATION, "calibrating")
    counts = {c.station_key: c for c in api.station_counts(db_session)}
    assert (counts[STATION].results, counts[STATION].scored, counts[STATION].confirmed_normal_scored,
            counts[STATION].calibrating) == (2, 2, 1, 1)
    assert (counts["ACME|HEADSCAN 9|CT-EAST"].results, counts["ACME|HEADSCAN 9|CT-EAST"].scored) == (1, 0)
    normals = api.calibration_candidates(db_session, "ct-x", "1.0", confirmed_normal_only=True)
    assert [(c.anomaly_score, c.confirmed_normal) for c in normals] == [(0.42, True)]
    assert len(api.calibration_candidates(db_session, "ct-x", "1.0")) == 3


# --------------------------------------------------------------------------- SR and overlay

CALIBRATING = ReferenceNote(kind="calibrating", text="Calibrating: no screen result until this scanner has 20 "
                                                     "healthy reference studies (has 3)")
SITE = ReferenceNote(kind="site", text=f"Reference: site, station {STATION}, n=60, created 2026-01-05",
                     legend="Reference: site, this scanner, n=60, created 2026-01-05")


def _calibrating_summary():
    return ct_summary(percentile=None, screen_positive=None, threshold=None)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    datasets, error = make_ct_series()
    out = tmp_path_factory.mktemp("sr")
    paths = {}
    for name, summary, note in (("calibrating", _calibrating_summary(), CALIBRATING), ("site", ct_summary(), SITE)):
        sr = build_report(datasets, summary, [], reference=note)
        paths[name] = out / f"{name}.dcm"
        sr.save_as(paths[name], enforce_file_format=True)
    return paths


def test_calibrating_report_has_a_score_but_no_screen_result(reports) -> None:
    path = str(reports["calibrating"])
    assert dciodvfy_errors(Path(path)) == []
    group = measurement_group(path)
    numbers = {m.name.value for m in group.get_measurements()}
    assert codes.ANOMALY_SCORE.value in numbers
    assert not numbers & {codes.ANOMALY_PERCENTILE.value, codes.OPERATING_THRESHOLD.value}
    coded = coded_evaluations(group)
    assert codes.SCREEN_RESULT.value not in coded  # not even "Absent"
    absent = {code for code, _ in coded.get(codes.ANOMALY_PERCENTILE.value, [])}
    assert not absent
    assert coded[codes.HEALTHY_REFERENCE.value] == [(codes.REFERENCE_CALIBRATING.value, CALIBRATING.text)]
    text = " ".join(sr_texts(pydicom.dcmread(path)))
    assert "Calibrating: no screen result until this scanner has 20 healthy reference studies (has 3)." in text
    assert "negative" not in text and "POSITIVE" not in text


def test_site_report_names_its_reference(reports) -> None:
    group = measurement_group(str(reports["site"]))
    coded = coded_evaluations(group)
    assert coded[codes.HEALTHY_REFERENCE.value] == [(codes.REFERENCE_SITE.value, SITE.text)]
    assert coded[codes.SCREEN_RESULT.value] == [(codes.SCREEN_POSITIVE.value, "")]
    assert codes.ANOMALY_PERCENTILE.value in {m.name.value for m in group.get_measurements()}
    assert SITE.text + "." in " ".join(sr_texts(pydicom.dcmread(str(reports["site"]))))


@pytest.mark.slow  # PixelMed's SR validator in a Java process
def test_pixelmed_finds_nothing_wrong_with_the_reference_items(reports) -> None:
    # The calibrating report only (the validator's set-up costs ~15 s): the site one differs by
    # the reference item's value and the screen result, both of a shape Pixelmed sees here too,
    # and tests/test_sr_conformance.py validates every kind of report.
    [lines] = pixelmed_findings([reports["calibrating"]]).values()
    assert any("Found Root Template TID_1500" in line for line in lines), lines[-40:]
    assert any("IOD validation complete" in line for line in lines), lines[-40:]
    assert errors_and_warnings(lines) == ([], [])


def test_report_and_overlay_refuse_a_calibrating_result_with_a_verdict() -> None:
    datasets, error = make_ct_series()
    with pytest.raises(ValueError, match="calibrating"):
        build_report(datasets, ct_summary(), [], reference=CALIBRATING)
    with pytest.raises(ValueError, match="calibrating"):
        build_overlay_series(datasets, error, ct_summary(), slice_indices=[20], reference=CALIBRATING)
    with pytest.raises(ValueError, match="kind"):
        ReferenceNote(kind="scanner", text="x")


def test_overlay_legend_says_calibrating_in_place_of_a_screen_result() -> None:
    lines = _legend_lines(_calibrating_summary(), (1.0, 3.0), "slice 1/40", CALIBRATING)
    texts = [t for t, _ in lines]
    assert (CALIBRATING.text, True) in lines
    assert not any(t.startswith("Screen result") for t in texts)
    assert not any("percentile" in t for t in texts)
    site = [t for t, _ in _legend_lines(ct_summary(), (1.0, 3.0), "slice 1/40", SITE)]
    assert SITE.legend in site and not any(STATION in t for t in site)
    datasets, error = make_ct_series()
    [sc] = build_overlay_series(datasets, error, _calibrating_summary(), slice_indices=[20], reference=CALIBRATING)
    assert "Calibrating" in sc.ImageComments


def test_a_site_corrected_brain_age_is_named_in_the_report_and_the_overlay(tmp_path) -> None:
    offset = 7.96
    summary = dataclasses.replace(MR_SUMMARY, predicted_age=MR_SUMMARY.predicted_age - offset,
                                  age_gap=MR_SUMMARY.age_gap - offset, age_offset=offset)
    text = (f"Reference: site, station {STATION}, n=60, created 2026-01-05; brain age corrected by -8.0 y, this "
            "scanner's median gap on 31 confirmed-normal studies")
    note = ReferenceNote(kind="site", text=text, legend="Reference: site, this scanner, n=60, created 2026-01-05")
    datasets, _ = make_ct_series()
    path = tmp_path / "sr.dcm"
    build_report(datasets, summary, [], reference=note).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    numbers = {m.name.value: m.value for m in measurement_group(str(path)).get_measurements()}
    assert float(numbers[codes.PREDICTED_BRAIN_AGE.value]) == pytest.approx(71.4 - offset)
    assert float(numbers[codes.BRAIN_AGE_GAP.value]) == pytest.approx(4.4 - offset)
    assert text + "." in " ".join(sr_texts(pydicom.dcmread(path)))
    lines = [t for t, _ in _legend_lines(summary, (1.0, 3.0), "slice 1/40", note)]
    assert "Brain-age gap -3.6 y (predicted 63.4 after this scanner's -8.0 y correction, chronological 67.0)" in lines
    plain = [t for t, _ in _legend_lines(MR_SUMMARY, (1.0, 3.0), "slice 1/40", SITE)]
    assert "Brain-age gap +4.4 y (predicted 71.4, chronological 67.0)" in plain
    # An MR bundle's scores are ~1e-5: significant digits, never "0.000".
    small = dataclasses.replace(MR_SUMMARY, anomaly_score=3.564e-05, threshold=4.127e-05)
    texts = [t for t, _ in _legend_lines(small, (1.0, 3.0), "slice 1/40", SITE)]
    assert "Anomaly score 3.564e-05 (42nd percentile of healthy reference)" in texts
    assert "Screen result: negative at threshold 4.127e-05" in texts


# --------------------------------------------------------------------------- config, CLI, console

def test_calibration_settings_are_validated(tmp_path) -> None:
    path = tmp_path / "hs.toml"
    path.write_text('allow_any_caller = true\n[calibration]\nmode = "site"\nmin_references = 30\ngrouping = "model"\n'
                    "age_min_studies = 40\n")
    settings = load_settings(path)
    assert (settings.calibration.mode, settings.calibration.min_references, settings.calibration.grouping,
            settings.calibration.age_min_studies) == ("site", 30, "model", 40)
    assert load_settings(None, allow_any_caller=True).calibration.age_min_studies == 20
    assert load_settings(None, allow_any_caller=True).calibration.mode == "bundle"
    for bad, key in (('mode = "scanner"', "calibration.mode"), ("min_references = 0", "calibration.min_references"),
                     ("threshold = 0.4", "calibration.threshold"),
                     ("age_min_studies = 1", "calibration.age_min_studies")):
        path.write_text(f"allow_any_caller = true\n[calibration]\n{bad}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_settings(path)


@pytest.fixture
def configured(tmp_path, ct_bundle):
    """A SQLite site whose CT bundle is the shipped one; returns (config, sessions, BundleRef, scoring)."""
    yield from _configured(tmp_path, ct_bundle)


@pytest.fixture
def configured_mr(tmp_path, mr_bundle):
    """As `configured`, with the shipped MR bundle (it predicts brain age)."""
    yield from _configured(tmp_path, mr_bundle)


@pytest.fixture(scope="module")
def mr_bundle():
    return next(b for b in (load_bundle(p) for p in shipped_bundles()) if b.manifest.modality == "MR")


def _configured(tmp_path, bundle):
    from headscreen.db.engine import make_engine, session_factory
    from headscreen.db.migrate import upgrade

    storage = tmp_path / "storage"
    storage.mkdir()
    config = tmp_path / "headscreen.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{storage}"\nbundles = ["{bundle.path}"]\n'
                      "[calibration]\nmin_references = 5\n")
    url = f"sqlite:///{storage / 'headscreen.db'}"
    upgrade(url)
    engine = make_engine(url)
    manifest = bundle.manifest
    yield (config, session_factory(engine), BundleRef(manifest.name, manifest.version, manifest.modality),
           scoring_identity(bundle))
    engine.dispose()


def test_cli_calibrates_lists_and_retires(configured, capsys) -> None:
    config, sessions, ref, scoring = configured
    rng = np.random.default_rng(0)
    with sessions() as session:
        for i in range(8):
            _scored(session, ref, float(0.45 + rng.normal(0, 0.01)), normal=True, scoring=scoring,
                    now=T0 + timedelta(minutes=i))
        _scored(session, ref, None, normal=True, now=T0 + timedelta(minutes=9))
        for i in range(6):  # another scanner, nobody confirmed its studies; one lesion among them
            _scored(session, ref, 0.9 if i == 2 else 0.50 + 0.001 * i, station="ACME|HEADSCAN 9|CT-EAST",
                    scoring=scoring, now=T0 + timedelta(minutes=10 + i))

    def cli(*argv: str) -> tuple[int, str]:
        code = main(["-c", str(config), "calibrate", *argv])
        return code, capsys.readouterr().out

    code, out = cli()
    assert code == 0 and "created site reference #1" in out and f"station {STATION}: n=8 of 9" in out
    assert "1 not_eligible" in out and 'mode is "bundle"' in out
    assert cli()[1].startswith("unchanged")  # the same studies again: nothing new
    code, out = cli("--first", "5", "--station", "ACME|HEADSCAN 9|CT-EAST", "--dry-run")
    assert code == 0 and "would create" in out and "n=4 of 5" in out and "1 outlier" in out
    assert "below min_references (5)" in out
    code, out = cli("--first", "5", "--station", "ACME|HEADSCAN 9|CT-EAST")
    assert "created site reference #2" in out
    code, out = cli("--list")
    assert "#1" in out and "#2" in out and "rule=first_n_robust (excluded: 1 outlier)" in out
    assert main(["-c", str(config), "calibrate", "--retire", "2"]) == 2  # no reason
    assert "needs --reason" in capsys.readouterr().err
    code, out = cli("--retire", "2", "--reason", "a lesion got in", "--actor", "alice")
    assert code == 0 and "retired site reference #2" in out
    assert "#2" not in cli("--list")[1] and "retired" in cli("--list", "--all")[1]
    assert main(["-c", str(config), "calibrate", "--retire", "2", "--reason", "again"]) == 2
    with sessions() as session:
        trail = api.audit_trail(session)
    assert [e.actor for e in trail if e.action == "site_reference_retired"] == ["alice"]
    assert main(["-c", str(config), "calibrate", "--bundle", "no-such-bundle"]) == 2


def test_console_shows_the_reference_per_scanner_and_retires_with_csrf(configured) -> None:
    from headscreen.daemon.web import create_app

    config, sessions, ref, scoring = configured
    settings = load_settings(config, calibration={"mode": "site", "min_references": 5})
    with sessions() as session:
        for i in range(6):
            _scored(session, ref, 0.45 + 0.001 * i, normal=True, scoring=scoring, kind="calibrating",
                    now=T0 + timedelta(minutes=i))
        _scored(session, ref, 0.47, station="ACME|HEADSCAN 9|CT-EAST", scoring=scoring, kind="calibrating")
        api.create_user(session, "alice", "admin-pass-1", "admin", actor="test")
        api.create_user(session, "victor", "viewer-pass-1", "viewer", actor="test")
    assert main(["-c", str(config), "calibrate", "--station", STATION]) == 0

    def client(user: str, password: str) -> TestClient:
        c = TestClient(create_app(settings, sessions, [ref]), follow_redirects=False)
        login = c.post("/api/v1/login", json={"username": user, "password": password})
        c.headers["X-CSRF-Token"] = login.json()["csrf_token"]
        return c

    admin = client("alice", "admin-pass-1")
    view = admin.get("/api/v1/calibration").json()
    assert view["mode"] == "site" and view["bundles"][0]["bundle_key"] == f"{ref.name}-{ref.version}"
    stations = {s["station"]: s for s in view["stations"]}
    assert stations[STATION]["in_use"] == "site" and stations[STATION]["n"] == 6
    assert stations[STATION]["provenance"]["rule"] == "confirmed_normal"
    east = stations["ACME|HEADSCAN 9|CT-EAST"]
    assert east["in_use"] == "calibrating" and east["needed"] == 5 and east["calibrating_results"] == 1
    assert "scores" not in view["references"][0]
    page = admin.get("/calibration").text
    assert STATION in page and "calibrating" in page and "<b>5</b> more" in page and "confirmed normal" in page
    viewer = client("victor", "viewer-pass-1")
    assert viewer.get("/calibration").status_code == 200
    assert viewer.post("/api/v1/calibration/references/1/retire", json={"reason": "x"}).status_code == 403
    csrf = admin.headers.pop("X-CSRF-Token")
    assert admin.post("/calibration/references/1/retire", data={"reason": "x"}).status_code == 403
    done = admin.post("/calibration/references/1/retire", data={"reason": "new detector", "csrf_token": csrf})
    assert done.status_code == 303
    after = {s["station"]: s for s in admin.get("/api/v1/calibration").json()["stations"]}
    assert after[STATION]["in_use"] == "calibrating" and after[STATION]["needed"] == 5
    assert admin.post("/calibration/references/1/retire",
                      data={"reason": "again", "csrf_token": csrf}).status_code == 404


def test_calibrate_keeps_each_scanners_brain_age_bias_shown_by_cli_and_console(configured_mr, capsys) -> None:
    from headscreen.daemon.web import create_app

    config, sessions, ref, scoring = configured_mr
    east = "ACME|HEADSCAN 9|MR-EAST"
    rng = np.random.default_rng(5)
    biased = []
    with sessions() as session:
        for i in range(24):  # this scanner's model ages run 8 years old
            true = float(rng.uniform(25, 80))
            biased.append(true + 8.0 + float(rng.normal(0, 3)) - true)
            _scored(session, ref, 0.4, normal=True, scoring=scoring, ages=(true + biased[-1], true),
                    now=T0 + timedelta(minutes=i))
        for i in range(4):  # patients, never confirmed normal: far older brains, not a reference
            _scored(session, ref, 0.5, scoring=scoring, ages=(90.0, 50.0), now=T0 + timedelta(minutes=30 + i))
        for i, gap in enumerate(rng.permutation(np.linspace(-4, 4, 22))):  # another scanner, no bias
            true = float(rng.uniform(25, 80))
            _scored(session, ref, 0.4, station=east, normal=True, scoring=scoring, ages=(true + float(gap), true),
                    now=T0 + timedelta(minutes=40 + i))
        api.create_user(session, "alice", "admin-pass-1", "admin", actor="test")

    def cli(*argv: str) -> str:
        assert main(["-c", str(config), "calibrate", *argv]) == 0
        return capsys.readouterr().out

    out = cli()
    median = float(np.median(biased))
    assert f"brain age: corrected by {-median:+.2f} y (median gap of 24 confirmed-normal studies" in out
    assert "brain age: not corrected (its 95 % interval" in out and "holds 0: no bias to correct)" in out
    assert cli().count("unchanged") == 2
    config.write_text(config.read_text() + "age_min_studies = 25\n")  # [calibration] is the file's last table
    assert "brain age: not corrected (24 studies with both ages, fewer than 25)" in cli("--dry-run")
    with sessions() as session:
        row = api.active_site_reference(session, ref.name, ref.version, scoring, "station", STATION)
    assert row is not None and row.provenance["brain_age"]["applied"] is True
    policy = ReferencePolicy(mode="site", min_references=5, lookup=lambda *key: row if key[-1] == STATION else None)
    chosen = policy.choose(load_bundle(load_settings(config).bundles[0]), STATION)
    assert isinstance(chosen, Reference) and chosen.age_offset == pytest.approx(median, abs=1e-3)

    # A result reported after that correction keeps it, and the next calibration reads the model's own age.
    with sessions() as session:
        corrected = _scored(session, ref, 0.4, normal=True, scoring=scoring, ages=(50.0, 49.0),
                            age_offset=round(median, 3), now=T0 + timedelta(hours=2))
        last = api.calibration_candidates(session, ref.name, ref.version, confirmed_normal_only=True)[-1]
    assert (last.predicted_age, last.chronological_age, last.age_offset) == (50.0, 49.0, round(median, 3))

    settings = load_settings(config, calibration={"mode": "site", "min_references": 5})
    client = TestClient(create_app(settings, sessions, [ref]), follow_redirects=False)
    assert client.post("/api/v1/login", json={"username": "alice", "password": "admin-pass-1"}).status_code == 200
    stations = {s["station"]: s for s in client.get("/api/v1/calibration").json()["stations"]}
    assert stations[STATION]["provenance"]["brain_age"]["n"] == 24
    page = client.get("/calibration").text
    assert "Brain-age correction" in page and f"<b>{-round(median, 3):+.1f} y</b>" in page
    assert "no bias to correct" in page
    # An MR bundle's scores are ~1e-5: shown in significant digits, not as 0.0000.
    with sessions() as session:
        small = _scored(session, ref, 3.564e-05, scoring=scoring, ages=(50.0, 49.0), now=T0 + timedelta(hours=3))
    assert "3.564e-05" in client.get(f"/studies/{small}").text
    assert "3.564e-05" in client.get("/studies").text
    study_page = client.get(f"/studies/{corrected}").text
    assert (f"50.0 <span class=\"muted\">after this scanner's {-round(median, 3):+.1f} y brain-age correction "
            f"(model: {50.0 + round(median, 3):.1f})</span>") in study_page


def test_station_views_follow_the_mode(ct_bundle) -> None:
    manifest = ct_bundle.manifest
    counts = [api.StationCounts(manifest.name, manifest.version, STATION, 30, 28, 25, 0)]
    row = _site_row(25)
    row = api.SiteReferenceRow(**{**row.__dict__, "bundle_name": manifest.name, "bundle_version": manifest.version,
                                  "scoring_sha256": scoring_identity(ct_bundle)})
    [bundle_mode] = station_views([ct_bundle], counts, [row], "bundle", 20, "station")
    assert bundle_mode.in_use == "bundle" and bundle_mode.unused_site_reference == 7
    assert bundle_mode.n == len(manifest.calibration.reference_scores)
    [site_mode] = station_views([ct_bundle], counts, [row], "site", 20, "station")
    assert site_mode.in_use == "site" and site_mode.reference_id == 7 and site_mode.needed is None
    [strict] = station_views([ct_bundle], counts, [row], "site", 40, "station")
    assert strict.in_use == "calibrating" and strict.n == 25 and strict.needed == 15
    [by_model] = station_views([ct_bundle], counts, [row], "site", 20, "model")
    assert by_model.station == "ACME|HEADSCAN 9" and by_model.in_use == "calibrating" and by_model.needed == 20
    assert math.isclose(site_mode.threshold, 0.5)


def test_a_score_that_is_not_a_number_gets_no_verdict(ct_bundle) -> None:
    from headscreen.daemon.pipeline import _judged

    reference = Reference.from_bundle(ct_bundle)
    assert _judged(float("nan"), reference) == (None, None, reference.threshold)
    assert _judged(10.0, reference) == (100.0, True, reference.threshold)
    assert _judged(10.0, Calibrating(STATION, 20, 3)) == (None, None, None)
