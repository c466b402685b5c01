"""Study-list query parameters: validated by FastAPI (malformed -> 422), then turned
into `db.types.StudyFilters`. Values only ever reach SQL as bound parameters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import HTTPException, Query, Request

from headscreen.daemon.web.context import context_of
from headscreen.daemon.web.searches import HANDLE, SearchHandles
from headscreen.db.types import STUDY_SORTS, StudyFilters

Tri = Literal["yes", "no"]
SortName = Literal["received", "first_received", "percentile", "score", "age_gap", "station", "modality"]
assert set(SortName.__args__) == set(STUDY_SORTS)  # type: ignore[attr-defined]

PER_PAGE_DEFAULT = 50
SEARCH_MAX_LEN = 64


@dataclass(frozen=True)
class StudyQuery:
    state: Literal["receiving", "complete"] | None = None
    modality: Literal["CT", "MR"] | None = None
    received_from: date | None = None
    received_to: date | None = None
    screen: Literal["positive", "negative"] | None = None
    min_percentile: float | None = None
    max_percentile: float | None = None
    min_age_gap: float | None = None
    max_age_gap: float | None = None
    qc_failed: Tri | None = None
    qc_reason: str | None = None
    flagged: Tri | None = None
    reviewed: Tri | None = None
    station: str | None = None
    eligible: Tri | None = None
    q: str | None = None  # accession number, patient ID or Study UID (or the start of one)
    find: str | None = None  # the handle q is kept under (daemon.web.searches); URLs carry this, never q
    sort: SortName = "received"
    order: Literal["asc", "desc"] = "desc"
    page: int = 1
    per_page: int = PER_PAGE_DEFAULT

    def to_filters(self, needs_review: bool = False) -> StudyFilters:
        if self.received_from and self.received_to and self.received_from > self.received_to:
            raise HTTPException(status_code=422, detail="received_from is after received_to")
        for low, high, name in ((self.min_percentile, self.max_percentile, "percentile"),
                                (self.min_age_gap, self.max_age_gap, "age_gap")):
            if low is not None and high is not None and low > high:
                raise HTTPException(status_code=422, detail=f"min_{name} is above max_{name}")
        return StudyFilters(
            state=self.state,
            modality=self.modality,
            received_from=_day_start(self.received_from),
            received_to=_day_start(self.received_to + timedelta(days=1)) if self.received_to else None,
            screen_positive=None if self.screen is None else self.screen == "positive",
            min_percentile=self.min_percentile,
            max_percentile=self.max_percentile,
            min_age_gap=self.min_age_gap,
            max_age_gap=self.max_age_gap,
            qc_failed_only=self.qc_failed == "yes",
            qc_reason=self.qc_reason or None,
            flagged=_tri(self.flagged),
            reviewed=_tri(self.reviewed),
            station=self.station or None,
            needs_review=needs_review,
            eligible=_tri(self.eligible),
            search=self.q or None,
            sort=self.sort,
            descending=self.order == "desc",
            limit=self.per_page,
            offset=(self.page - 1) * self.per_page,
        )

    def query_string(self, **changes: object) -> str:
        """This query with some parameters changed, for pagination and sort links."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "q"} | changes
        defaults = StudyQuery()
        kept = {k: str(v) for k, v in values.items() if v is not None and v != "" and v != getattr(defaults, k)}
        return urlencode(kept)


def _tri(value: Tri | None) -> bool | None:
    return None if value is None else value == "yes"


def _day_start(day: date | None) -> datetime | None:
    return datetime.combine(day, time(0), tzinfo=UTC) if day else None


def _blank_to_none(value: str | None) -> str | None:
    return value if value else None


def study_query(
    request: Request,
    state: Annotated[Literal["receiving", "complete"] | None, Query()] = None,
    modality: Annotated[Literal["CT", "MR"] | None, Query()] = None,
    received_from: Annotated[date | None, Query()] = None,
    received_to: Annotated[date | None, Query()] = None,
    screen: Annotated[Literal["positive", "negative"] | None, Query()] = None,
    min_percentile: Annotated[float | None, Query(ge=0, le=100)] = None,
    max_percentile: Annotated[float | None, Query(ge=0, le=100)] = None,
    min_age_gap: Annotated[float | None, Query(ge=-200, le=200)] = None,
    max_age_gap: Annotated[float | None, Query(ge=-200, le=200)] = None,
    qc_failed: Annotated[Tri | None, Query()] = None,
    qc_reason: Annotated[str | None, Query(max_length=64)] = None,
    flagged: Annotated[Tri | None, Query()] = None,
    reviewed: Annotated[Tri | None, Query()] = None,
    station: Annotated[str | None, Query(max_length=64)] = None,
    eligible: Annotated[Tri | None, Query()] = None,
    find: Annotated[str | None, Query(pattern=HANDLE.pattern)] = None,
    sort: Annotated[SortName, Query()] = "received",
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = PER_PAGE_DEFAULT,
) -> StudyQuery:
    if "q" in request.query_params:  # an old link: say so rather than list every study
        raise HTTPException(status_code=422, detail="a search term is not taken from the URL: post it to "
                                                    "/api/v1/searches (or use the console's search box)")
    term = None
    if find:
        term = context_of(request).searches.get(find)
        if term is None:
            raise HTTPException(status_code=410, detail="this search has expired (or the console restarted): "
                                                        "search again")
    return StudyQuery(state=state, modality=modality, received_from=received_from, received_to=received_to,
                      screen=screen, min_percentile=min_percentile, max_percentile=max_percentile,
                      min_age_gap=min_age_gap, max_age_gap=max_age_gap, qc_failed=qc_failed,
                      qc_reason=_blank_to_none(qc_reason), flagged=flagged, reviewed=reviewed,
                      station=_blank_to_none(station), eligible=eligible, q=term, find=find if term else None,
                      sort=sort, order=order, page=page, per_page=per_page)


def search_target(form: dict[str, str], searches: SearchHandles) -> str:
    """The list URL's query string for a posted filter form: its fields as they are, except
    the search term, which is kept on the server and replaced by its handle."""
    fields = [name for name in StudyQuery.__dataclass_fields__ if name not in ("q", "find", "page")]
    kept = {name: form[name].strip() for name in fields if form.get(name, "").strip()}
    term = form.get("q", "").strip()
    if len(term) > SEARCH_MAX_LEN:
        raise HTTPException(status_code=422, detail=f"the search term is longer than {SEARCH_MAX_LEN} characters")
    if term:
        kept["find"] = searches.put(term)
    return urlencode(kept)
