"""``javascript:gs.*`` date helpers: values at a fixed clock, strict parsing, no script run."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.instance import glide_dates
from bridge.instance.glide_dates import (
    HELPERS,
    ScriptError,
    call,
    evaluate,
    is_script,
    normalize,
)


def at(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)))


NOW = at(2024, 2, 29, 13, 45, 30)  # a Thursday in a leap year, first quarter


def ev(expression: str, now: float = NOW) -> str:
    return evaluate(expression, now, user_id="6816f79cc0a8016401c5a33be04be441", user_name="abel")


VALUES: list[tuple[str, str]] = [
    ("beginningOfToday()", "2024-02-29 00:00:00"),
    ("endOfToday()", "2024-02-29 23:59:59"),
    ("beginningOfYesterday()", "2024-02-28 00:00:00"),
    ("endOfYesterday()", "2024-02-28 23:59:59"),
    ("beginningOfTomorrow()", "2024-03-01 00:00:00"),
    ("endOfTomorrow()", "2024-03-01 23:59:59"),
    ("beginningOfThisWeek()", "2024-02-26 00:00:00"),  # Monday
    ("endOfThisWeek()", "2024-03-03 23:59:59"),  # Sunday
    ("beginningOfLastWeek()", "2024-02-19 00:00:00"),
    ("endOfLastWeek()", "2024-02-25 23:59:59"),
    ("beginningOfNextWeek()", "2024-03-04 00:00:00"),
    ("endOfNextWeek()", "2024-03-10 23:59:59"),
    ("beginningOfThisMonth()", "2024-02-01 00:00:00"),
    ("endOfThisMonth()", "2024-02-29 23:59:59"),
    ("beginningOfLastMonth()", "2024-01-01 00:00:00"),
    ("endOfLastMonth()", "2024-01-31 23:59:59"),
    ("beginningOfNextMonth()", "2024-03-01 00:00:00"),
    ("endOfNextMonth()", "2024-03-31 23:59:59"),
    ("beginningOfThisQuarter()", "2024-01-01 00:00:00"),
    ("endOfThisQuarter()", "2024-03-31 23:59:59"),
    ("beginningOfLastQuarter()", "2023-10-01 00:00:00"),
    ("endOfLastQuarter()", "2023-12-31 23:59:59"),
    ("beginningOfNextQuarter()", "2024-04-01 00:00:00"),
    ("endOfNextQuarter()", "2024-06-30 23:59:59"),
    ("beginningOfThisYear()", "2024-01-01 00:00:00"),
    ("endOfThisYear()", "2024-12-31 23:59:59"),
    ("beginningOfLastYear()", "2023-01-01 00:00:00"),
    ("endOfLastYear()", "2023-12-31 23:59:59"),
    ("beginningOfNextYear()", "2025-01-01 00:00:00"),
    ("endOfNextYear()", "2025-12-31 23:59:59"),
    ("beginningOfCurrentHour()", "2024-02-29 13:00:00"),
    ("endOfCurrentHour()", "2024-02-29 13:59:59"),
    ("beginningOfLastHour()", "2024-02-29 12:00:00"),
    ("endOfLastHour()", "2024-02-29 12:59:59"),
    ("beginningOfCurrentMinute()", "2024-02-29 13:45:00"),
    ("endOfCurrentMinute()", "2024-02-29 13:45:59"),
    ("beginningOfLastMinute()", "2024-02-29 13:44:00"),
    ("endOfLastMinute()", "2024-02-29 13:44:59"),
    ("beginningOfLast15Minutes()", "2024-02-29 13:30:00"),
    ("endOfLast15Minutes()", "2024-02-29 13:45:59"),
    ("beginningOfLast2Hours()", "2024-02-29 11:00:00"),
    ("beginningOfLast7Days()", "2024-02-22 00:00:00"),
    ("endOfLast7Days()", "2024-02-29 23:59:59"),
    ("beginningOfLast3Months()", "2023-11-01 00:00:00"),
    ("endOfLast3Months()", "2024-02-29 23:59:59"),
    ("beginningOfLast2Quarters()", "2023-07-01 00:00:00"),
    ("beginningOfNext2Quarters()", "2024-04-01 00:00:00"),
    ("endOfNext2Quarters()", "2024-09-30 23:59:59"),
    ("beginningOfLast2Years()", "2022-01-01 00:00:00"),
    ("beginningOfOneYearAgo()", "2023-02-28 00:00:00"),  # no 29 February in 2023
    ("endOfOneYearAgo()", "2023-02-28 23:59:59"),
    ("daysAgo(1)", "2024-02-28 13:45:30"),
    ("daysAgo(-90)", "2024-05-29 13:45:30"),  # negative: ahead
    ("daysAgoStart(1)", "2024-02-28 00:00:00"),
    ("daysAgoStart('5')", "2024-02-24 00:00:00"),  # GlideSystem documents a String
    ("daysAgoEnd(0)", "2024-02-29 23:59:59"),
    ("daysAgoLocal(2)", "2024-02-27 00:00:00"),
    ("hoursAgo(2)", "2024-02-29 11:45:30"),
    ("hoursAgoStart(1)", "2024-02-29 12:00:00"),
    ("hoursAgoEnd(1)", "2024-02-29 12:59:59"),
    ("minutesAgo(15)", "2024-02-29 13:30:30"),
    ("minutesAgoStart(30)", "2024-02-29 13:15:00"),
    ("minutesAgoEnd(30)", "2024-02-29 13:15:59"),
    ("monthsAgo(1)", "2024-01-29 13:45:30"),
    ("monthsAgoStart(3)", "2023-11-01 00:00:00"),
    ("monthsAgoEnd(2)", "2023-12-31 23:59:59"),
    ("quartersAgo(4)", "2023-02-28 13:45:30"),
    ("quartersAgoStart(1)", "2023-10-01 00:00:00"),
    ("quartersAgoEnd(1)", "2023-12-31 23:59:59"),
    ("yearsAgo(1)", "2023-02-28 13:45:30"),
    ("now()", "2024-02-29"),
    ("nowDateTime()", "2024-02-29 13:45:30"),
    ("nowNoTZ()", "2024-02-29 13:45:30"),
    ("nowGlideDateTime()", "2024-02-29 13:45:30"),
    ("yesterday()", "2024-02-28 13:45:30"),
    ("lastWeek()", "2024-02-22 13:45:30"),
    ("dateGenerate('2015-10-07','00:00:00')", "2015-10-07 00:00:00"),
    ("dateGenerate('2015-10-07','start')", "2015-10-07 00:00:00"),
    ("dateGenerate('2015-10-07','end')", "2015-10-07 23:59:59"),
    ('dateGenerate("2015-10-07", "18:30:05")', "2015-10-07 18:30:05"),
    ("getUserID()", "6816f79cc0a8016401c5a33be04be441"),
    ("userID()", "6816f79cc0a8016401c5a33be04be441"),
    ("getUserName()", "abel"),
]


@pytest.mark.parametrize(("call_text", "expected"), VALUES, ids=[c for c, _ in VALUES])
def test_helpers_at_a_fixed_clock(call_text: str, expected: str) -> None:
    assert ev("javascript:gs." + call_text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "javascript:gs.daysAgoStart(1)",
        "javascript:gs.daysAgoStart(1);",
        " javascript: gs.daysAgoStart( 1 ) ; ",
        "javascript:gs . daysAgoStart(1)",
        "JavaScript:gs.daysAgoStart(1)",
    ],
)
def test_whitespace_and_a_trailing_semicolon_are_allowed(text: str) -> None:
    assert ev(text) == "2024-02-28 00:00:00"


def test_period_edges_across_year_and_month_ends() -> None:
    new_year = at(2024, 1, 1, 0, 0, 0)  # a Monday
    assert ev("javascript:gs.beginningOfThisWeek()", new_year) == "2024-01-01 00:00:00"
    assert ev("javascript:gs.beginningOfLastMonth()", new_year) == "2023-12-01 00:00:00"
    assert ev("javascript:gs.endOfLastQuarter()", new_year) == "2023-12-31 23:59:59"
    sunday = at(2024, 3, 31, 23, 59, 59)
    assert ev("javascript:gs.beginningOfThisWeek()", sunday) == "2024-03-25 00:00:00"
    assert ev("javascript:gs.monthsAgo(1)", sunday) == "2024-02-29 23:59:59"  # day clamped
    assert ev("javascript:gs.beginningOfTomorrow()", sunday) == "2024-04-01 00:00:00"
    assert ev("javascript:gs.endOfNextQuarter()", sunday) == "2024-06-30 23:59:59"
    assert ev("javascript:gs.now()", at(2024, 3, 31, 23, 59, 59) + 0.9) == "2024-03-31"


REFUSED: list[tuple[str, str]] = [
    ("javascript:getMyGroups()", "not one gs.<method>(...) call"),
    ("javascript:gs.getUser().getMyGroups()", "not one gs.<method>(...) call"),
    ("javascript:gs.daysAgo(1)+1", "not one gs.<method>(...) call"),
    ("javascript:gs.daysAgo(1);gs.log(1)", "not one gs.<method>(...) call"),
    ("javascript:gs.daysAgo(1); 2", "not one gs.<method>(...) call"),
    ("javascript:new GlideDateTime()", "not one gs.<method>(...) call"),
    ("javascript:gs.eval('1')", "gs.eval is not a supported GlideSystem helper"),
    ("javascript:gs.getProperty('glide.servlet.uri')", "not a supported GlideSystem helper"),
    ("javascript:gs.hasRole('admin')", "not a supported GlideSystem helper"),
    ("javascript:gs.datePart('dayofweek','monday','EE')", "not a supported GlideSystem helper"),
    ("javascript:gs.daysAgo(1,)", "arguments must be integers or quoted strings"),
    ("javascript:gs.daysAgo(1 2)", "arguments must be integers or quoted strings"),
    ("javascript:gs.daysAgo(x)", "arguments must be integers or quoted strings"),
    ("javascript:gs.daysAgo(1.5)", "arguments must be integers or quoted strings"),
    ("javascript:gs.daysAgo('1\\')", "arguments must be integers or quoted strings"),
    ("javascript:gs.daysAgo()", "gs.daysAgo takes 1 argument"),
    ("javascript:gs.beginningOfToday(1)", "gs.beginningOfToday takes 0 arguments"),
    ("javascript:gs.daysAgo('one')", "'one' is not an integer"),
    ("javascript:gs.daysAgo(100001)", "out of range"),
    ("javascript:gs.yearsAgo(-8000)", "out of range"),
    ("javascript:gs.dateGenerate('2015-13-01','start')", "is not a date (yyyy-mm-dd)"),
    ("javascript:gs.dateGenerate('2015-10-07 10:00:00','start')", "is not a date"),
    ("javascript:gs.dateGenerate('2015-10-07','noon')", "is not start, end or hh:mm:ss"),
    ("javascript:gs.dateGenerate('2015-10-07','25:00:00')", "is not start, end or hh:mm:ss"),
    ("javascript:gs.dateGenerate('2015-10-07')", "takes 2 arguments"),
    ("gs.daysAgo(1)", "not one gs.<method>(...) call"),
]


@pytest.mark.parametrize(("text", "fault"), REFUSED, ids=[t for t, _ in REFUSED])
def test_anything_else_is_refused_with_the_reason(text: str, fault: str) -> None:
    with pytest.raises(ScriptError) as info:
        ev(text)
    assert fault in info.value.message


def test_call_parses_arguments_strictly() -> None:
    assert call("javascript:gs.x()") == ("x", ())
    assert call("javascript:gs.x(1, -2, 'a,b', \"c\")") == ("x", (1, -2, "a,b", "c"))
    assert call("javascript:gs.datePart('dayofweek','monday','GE')") == (
        "datePart",
        ("dayofweek", "monday", "GE"),
    )


def test_is_script() -> None:
    assert is_script("javascript:gs.now()")
    assert is_script("  JAVASCRIPT:x")
    assert not is_script("java")
    assert not is_script("x javascript:gs.now()")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-05", "2024-01-05 00:00:00"),
        ("2024-01-05 10:30", "2024-01-05 10:30:00"),
        ("2024-01-05 10:30:07", "2024-01-05 10:30:07"),
        (" 2024-01-05T10:30:07Z ", "2024-01-05 10:30:07"),
        ("2024-01-05T10:30:07.123", "2024-01-05 10:30:07"),
        ("2024-02-30", None),
        ("2024-01-05 24:00:00", None),
        ("05/01/2024", None),
        ("today", None),
        ("", None),
    ],
)
def test_normalize(value: str, expected: str | None) -> None:
    assert normalize(value) == expected


def test_every_helper_answers_a_value() -> None:
    for name in sorted(HELPERS):
        args = "3" if "Ago" in name and "OneYear" not in name else ""
        if name == "dateGenerate":
            args = "'2024-01-01','start'"
        assert ev(f"javascript:gs.{name}({args})")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.floats(min_value=0, max_value=4e9))
def test_any_text_evaluates_or_is_refused(text: str, now: float) -> None:
    for expression in (text, "javascript:" + text, "javascript:gs." + text):
        try:
            value = evaluate(expression, now, user_id="u", user_name="n")
        except ScriptError:
            continue
        assert isinstance(value, str)


def test_date_generate_takes_one_date_time_as_pysnow_sends_it() -> None:
    # pysnow's QueryBuilder.between(datetime, datetime) sends one double-quoted argument.
    assert (
        glide_dates.evaluate(
            'javascript:gs.dateGenerate("2024-03-01 10:20:30")', 0, user_id="", user_name=""
        )
        == "2024-03-01 10:20:30"
    )
    with pytest.raises(glide_dates.ScriptError, match="not a date-time"):
        glide_dates.evaluate(
            'javascript:gs.dateGenerate("2024-03-01")', 0, user_id="", user_name=""
        )
