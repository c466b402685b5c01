import pytest

from headscreen.daemon.ages import chronological_age, parse_age_string


@pytest.mark.parametrize(("text", "years"), [("063Y", 63.0), ("006M", 0.5), ("052W", 52 * 7 / 365.25), ("", None),
                                           ("63", None), ("063X", None)])
def test_age_strings(text, years):
    result = parse_age_string(text)
    assert result == pytest.approx(years) if years is not None else result is None


def test_dates_preferred_over_rounded_age_string():
    age, source = chronological_age("063Y", "19600701", "20240101")
    assert source == "dates"
    assert age == pytest.approx(63.5, abs=0.01)


def test_absent_age_says_why():
    age, source = chronological_age(None, "garbage", "20240101")
    assert age is None and source.startswith("absent")
