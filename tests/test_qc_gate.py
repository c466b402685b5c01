"""Every QC reason is either blocking (the study is not eligible) or advisory, every one
has its own code in the SR, and docs/conformance.md says the same as the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from headscreen.export import codes
from headscreen.imaging import qc

CONFORMANCE = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"

def _is_advisory(prefix: str) -> bool:
    """The same prefix rule as imaging.qc.is_blocking, applied to ADVISORY."""
    return any(prefix == name or prefix.startswith(name + "_") for name in qc.ADVISORY)


def _classes(prefix: str) -> list[str]:
    found = []
    if qc.is_blocking(f"{prefix}: detail"):
        found.append("blocking")
    if _is_advisory(prefix):
        found.append("advisory")
    return found


def _all_prefixes() -> list[str]:
    return sorted({*qc.REASON_PREFIX.values(), *codes.known_qc_reasons()})


@pytest.mark.parametrize("prefix", _all_prefixes())
def test_every_reason_prefix_is_exactly_one_of_blocking_or_advisory(prefix):
    assert len(_classes(prefix)) == 1, (prefix, _classes(prefix))


def test_no_suitable_series_is_blocking():
    assert _classes("no_suitable_series") == ["blocking"]


@pytest.mark.parametrize("prefix, kind", [
    ("input_undecodable", "blocking"), ("input_rejected", "blocking"),
    ("header_values_dropped", "advisory"), ("instances_excluded", "advisory"), ("seg_not_built", "advisory"),
])
def test_bad_input_reasons_of_the_pipeline_are_registered(prefix, kind):
    # The pipeline emits these (daemon/pipeline.py); unregistered they would fall to HS0199.
    assert _classes(prefix) == [kind]
    assert codes.qc_reason_code(f"{prefix}: detail").value != codes.QC_OTHER_VALUE


def test_blocking_and_advisory_do_not_overlap():
    assert not qc.BLOCKING & qc.ADVISORY


@pytest.mark.parametrize("prefix", sorted(qc.BLOCKING | qc.ADVISORY))
def test_every_listed_prefix_has_its_own_code(prefix):
    code = codes.qc_reason_code(f"{prefix}: detail")
    assert code.value != codes.QC_OTHER_VALUE and code.scheme_designator == codes.PRIVATE_SCHEME
    assert len(code.meaning) <= 64


def test_qc_code_values_are_unique():
    values = [code.value for code in codes.known_qc_reasons().values()]
    assert len(values) == len(set(values))


def test_blocking_reasons_keeps_order_and_drops_advisory():
    reasons = ["skull_defect: skull_coverage 0.1", "noise_high: noise_sigma 40", "chronological_age_absent",
               "orientation_flipped: upside down", "noise_high: noise_sigma 40"]
    assert qc.blocking_reasons(reasons) == ["noise_high: noise_sigma 40", "orientation_flipped: upside down"]


def _documented_qc_rows() -> dict[str, tuple[str, str]]:
    """prefix -> (code, class) from the QC table of docs/conformance.md."""
    rows = {}
    for line in CONFORMANCE.read_text().splitlines():
        match = re.match(r"\|\s*`?([a-z_]+)`?…?\s*\|\s*(HS\d{4})\s*\|\s*(blocking|advisory)\b", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_conformance_table_matches_the_code():
    documented = _documented_qc_rows()
    for prefix in sorted(qc.BLOCKING | qc.ADVISORY | set(codes.known_qc_reasons())):
        assert prefix in documented, prefix
        code, kind = documented[prefix]
        assert code == codes.qc_reason_code(f"{prefix}: x").value, prefix
        assert kind == ("blocking" if qc.is_blocking(f"{prefix}: x") else "advisory"), prefix
