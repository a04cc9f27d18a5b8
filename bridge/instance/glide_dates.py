"""``javascript:gs.*`` values of encoded queries: the GlideSystem date helpers, in UTC.

ServiceNow evaluates a query value starting ``javascript:`` as server-side script; clients
use a small set of GlideSystem (``gs``) calls in filters, e.g.
``sys_created_on>javascript:gs.daysAgoStart(1)`` or the condition builder's
``sys_created_onONToday@javascript:gs.beginningOfToday()@javascript:gs.endOfToday()``.
Nothing here runs script: ``call`` parses exactly one ``gs.<name>(<args>)`` call (integer or
quoted-string arguments, optional whitespace and a trailing ``;``) and ``evaluate`` looks the
name up in a table of pure functions of the clock. Anything else raises ``ScriptError``.

The session time zone is UTC (the instance stores and compares UTC), so "beginning of
today" is 00:00:00 UTC. Weeks start on Monday (GlideSystem ``isFirstDayOfWeek``: ISO).
Results are text ``YYYY-MM-DD HH:MM:SS`` (``gs.now()``: ``YYYY-MM-DD``), as GlideSystem's.
Reference: GlideSystem - Global (docs.servicenow.com, api-reference/server-api-reference/
c_GlideSystemAPI) and the MobileGlideSystem list of the beginningOfX()/endOfX() pairs.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

FORMAT = "%Y-%m-%d %H:%M:%S"
MAX_ARGUMENT = 100_000  # |n| of daysAgo(n) etc.: beyond any real use, and never an overflow
UNITS = ("second", "minute", "hour", "day", "week", "month", "quarter", "year")

Argument = int | str


class ScriptError(ValueError):
    """A ``javascript:`` value that is not one supported ``gs.*`` call; ``message`` says
    why (the caller names the value)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def is_script(value: str) -> bool:
    """``value`` is a ``javascript:`` value (ServiceNow would run it as script)."""
    return value.lstrip()[:11].lower() == "javascript:"


_CALL = re.compile(
    r"""\s*(?i:javascript):\s*gs\s*\.\s*([A-Za-z][A-Za-z0-9]*)\s*"""
    r"""\(((?:[^()'"]|'[^']*'|"[^"]*")*)\)\s*;?\s*""",
    re.S,
)
_ARG = re.compile(r"""\s*(?:(-?\d{1,9})|'([^'\\]*)'|"([^"\\]*)")\s*(,|\Z)""")


def call(expression: str) -> tuple[str, tuple[Argument, ...]]:
    """``(name, args)`` of ``javascript:gs.name(args)``; ScriptError for anything else."""
    match = _CALL.fullmatch(expression)
    if match is None:
        raise ScriptError("not one gs.<method>(...) call: no script is run here")
    name, text = match.group(1), match.group(2)
    args: list[Argument] = []
    pos = 0
    while text.strip() and pos < len(text):
        arg = _ARG.match(text, pos)
        if arg is None or (arg.group(4) == "," and arg.end() == len(text)):
            raise ScriptError(f"gs.{name}: arguments must be integers or quoted strings")
        number, single, double = arg.group(1), arg.group(2), arg.group(3)
        args.append(int(number) if number is not None else (single or double or ""))
        pos = arg.end()
    return name, tuple(args)


def evaluate(expression: str, now: float, *, user_id: str, user_name: str) -> str:
    """The value of ``javascript:gs.<helper>(...)`` at ``now`` (epoch seconds, UTC).

    ``gs.getUserID()`` / ``gs.getUserName()`` answer ``user_id`` / ``user_name``.
    """
    name, args = call(expression)
    if name in ("getUserID", "userID"):
        _arity(name, args, 0)
        return user_id
    if name == "getUserName":
        _arity(name, args, 0)
        return user_name
    try:
        moment = datetime.fromtimestamp(int(now), UTC).replace(tzinfo=None)
        fixed = _FIXED.get(name)
        if fixed is not None:
            _arity(name, args, 0)
            return fixed(moment)
        counted = _COUNTED.get(name)
        if counted is not None:
            _arity(name, args, 1)
            return text(counted(moment, _integer(name, args[0])))
        if name == "dateGenerate":
            return _date_generate(args)
    except (OverflowError, ValueError) as exc:
        if isinstance(exc, ScriptError):
            raise
        raise ScriptError(f"gs.{name}: the date is out of range") from None
    raise ScriptError(f"gs.{name} is not a supported GlideSystem helper")


def text(moment: datetime) -> str:
    return moment.strftime(FORMAT)


_DATE_FORMS = (
    re.compile(r"(\d{4})-(\d{2})-(\d{2})"),
    re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2})"),
    re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?Z?"),
)


def normalize(value: str) -> str | None:
    """A date or date-time in one of the forms a glide_date_time value is given in, as
    ``YYYY-MM-DD HH:MM:SS``: ``2024-01-05`` (00:00:00), ``2024-01-05 10:30``,
    ``2024-01-05 10:30:00``, ``2024-01-05T10:30:00[.fff][Z]`` (UTC). None otherwise."""
    for form in _DATE_FORMS:
        match = form.fullmatch(value.strip())
        if match is None:
            continue
        parts = [int(p) for p in match.groups()]
        try:
            return text(datetime(*parts))  # type: ignore[arg-type]
        except ValueError:
            return None
    return None


def parse_text(value: str) -> datetime:
    """The datetime of a normalized ``YYYY-MM-DD HH:MM:SS`` value."""
    return datetime.strptime(value, FORMAT)


# --- calendar arithmetic -----------------------------------------------------------------


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` ``months`` later (earlier if negative), the day clamped to the month."""
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def shift(moment: datetime, unit: str, amount: int) -> datetime:
    """``moment`` plus ``amount`` ``unit``s (see ``UNITS``)."""
    if unit == "month":
        return add_months(moment, amount)
    if unit == "quarter":
        return add_months(moment, 3 * amount)
    if unit == "year":
        return add_months(moment, 12 * amount)
    seconds = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}[unit]
    return moment + timedelta(seconds=seconds * amount)


def start_of(moment: datetime, unit: str) -> datetime:
    """The first second of the ``unit`` (minute, hour, day, week from Monday, month,
    quarter, year) holding ``moment``."""
    moment = moment.replace(microsecond=0)
    if unit == "second":
        return moment
    if unit == "minute":
        return moment.replace(second=0)
    if unit == "hour":
        return moment.replace(minute=0, second=0)
    day = moment.replace(hour=0, minute=0, second=0)
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    if unit == "quarter":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    return day.replace(month=1, day=1)  # year


def end_of(moment: datetime, unit: str) -> datetime:
    """The last second of the ``unit`` holding ``moment``."""
    return shift(start_of(moment, unit), unit, 1) - timedelta(seconds=1)


# --- the helpers ---------------------------------------------------------------------------

_PERIODS = {"Week": "week", "Month": "month", "Quarter": "quarter", "Year": "year"}


def _span(unit: str, first: int, last: int) -> tuple[Callable[[datetime], str], ...]:
    """(beginning, end) of the span from the ``unit`` ``first`` units away to the one
    ``last`` units away (negative: in the past)."""
    return (
        lambda now: text(start_of(shift(now, unit, first), unit)),
        lambda now: text(end_of(shift(now, unit, last), unit)),
    )


def _fixed_helpers() -> dict[str, Callable[[datetime], str]]:
    spans: dict[str, tuple[str, int, int]] = {
        "Today": ("day", 0, 0),
        "Yesterday": ("day", -1, -1),
        "Tomorrow": ("day", 1, 1),
        "CurrentHour": ("hour", 0, 0),
        "LastHour": ("hour", -1, -1),
        "CurrentMinute": ("minute", 0, 0),
        "LastMinute": ("minute", -1, -1),
        # "Last N <units>": from the start of the unit N units ago to the end of the
        # current one (the condition builder's older form of "Last 7 days" was
        # daysAgoStart(7)@daysAgoEnd(0)).
        "Last2Hours": ("hour", -2, 0),
        "Last15Minutes": ("minute", -15, 0),
        "Last30Minutes": ("minute", -30, 0),
        "Last45Minutes": ("minute", -45, 0),
        "Last7Days": ("day", -7, 0),
        "Last30Days": ("day", -30, 0),
        "Last60Days": ("day", -60, 0),
        "Last90Days": ("day", -90, 0),
        "Last120Days": ("day", -120, 0),
        "Last3Months": ("month", -3, 0),
        "Last6Months": ("month", -6, 0),
        "Last9Months": ("month", -9, 0),
        "Last12Months": ("month", -12, 0),
        "Last2Quarters": ("quarter", -2, 0),
        "Next2Quarters": ("quarter", 1, 2),
        "Last2Years": ("year", -2, 0),
    }
    for label, unit in _PERIODS.items():
        spans[f"This{label}"] = (unit, 0, 0)
        spans[f"Last{label}"] = (unit, -1, -1)
        spans[f"Next{label}"] = (unit, 1, 1)
    helpers: dict[str, Callable[[datetime], str]] = {}
    for label, (unit, first, last) in spans.items():
        helpers[f"beginningOf{label}"], helpers[f"endOf{label}"] = _span(unit, first, last)
    # "One year ago": the day one year before today.
    helpers["beginningOfOneYearAgo"] = lambda now: text(start_of(add_months(now, -12), "day"))
    helpers["endOfOneYearAgo"] = lambda now: text(end_of(add_months(now, -12), "day"))
    helpers["now"] = lambda now: now.strftime("%Y-%m-%d")
    for name in ("nowDateTime", "nowNoTZ", "nowGlideDateTime"):
        helpers[name] = text
    helpers["yesterday"] = lambda now: text(now - timedelta(days=1))
    helpers["lastWeek"] = lambda now: text(now - timedelta(days=7))
    return helpers


def _ago(unit: str, edge: str) -> Callable[[datetime, int], datetime]:
    def helper(now: datetime, n: int) -> datetime:
        moment = shift(now, unit, -n)
        if edge == "start":
            return start_of(moment, unit)
        return end_of(moment, unit) if edge == "end" else moment

    return helper


def _counted_helpers() -> dict[str, Callable[[datetime, int], datetime]]:
    helpers: dict[str, Callable[[datetime, int], datetime]] = {}
    for prefix, unit in (
        ("minutes", "minute"),
        ("hours", "hour"),
        ("days", "day"),
        ("months", "month"),
        ("quarters", "quarter"),
    ):
        helpers[f"{prefix}Ago"] = _ago(unit, "")
        helpers[f"{prefix}AgoStart"] = _ago(unit, "start")
        helpers[f"{prefix}AgoEnd"] = _ago(unit, "end")
    helpers["daysAgoLocal"] = helpers["daysAgoStart"]  # local time is UTC here
    helpers["yearsAgo"] = _ago("year", "")
    return helpers


_FIXED = _fixed_helpers()
_COUNTED = _counted_helpers()
HELPERS = frozenset(
    {*_FIXED, *_COUNTED, "dateGenerate", "getUserID", "getUserName", "userID"}
)  # every gs.<name> evaluate() knows


def _date_generate(args: tuple[Argument, ...]) -> str:
    if len(args) == 1:
        # One date-time argument, 'yyyy-mm-dd hh:mm:ss': what pysnow's QueryBuilder sends
        # for between(datetime, datetime); ServiceNow's filters give the date and time apart.
        whole = normalize(str(args[0]))
        if whole is None or len(str(args[0]).strip()) != 19:
            raise ScriptError(
                "gs.dateGenerate takes 2 arguments ('yyyy-mm-dd', 'hh:mm:ss'|'start'|'end') "
                f"or one date-time; {args[0]!r} is not a date-time (yyyy-mm-dd hh:mm:ss)"
            )
        return whole
    _arity("dateGenerate", args, 2)
    date, when = (str(a) for a in args)
    if normalize(date) is None or len(date.strip()) != 10:
        raise ScriptError(f"gs.dateGenerate: {date!r} is not a date (yyyy-mm-dd)")
    day = date.strip()
    if when == "start":
        return f"{day} 00:00:00"
    if when == "end":
        return f"{day} 23:59:59"
    moment = normalize(f"{day} {when}")
    if moment is None or not re.fullmatch(r"\d{2}:\d{2}:\d{2}", when):
        raise ScriptError(f"gs.dateGenerate: {when!r} is not start, end or hh:mm:ss")
    return moment


def _arity(name: str, args: tuple[Argument, ...], count: int) -> None:
    if len(args) != count:
        raise ScriptError(f"gs.{name} takes {count} argument{'s' if count != 1 else ''}")


def _integer(name: str, arg: Argument) -> int:
    if isinstance(arg, str):
        if not re.fullmatch(r"\s*-?\d{1,9}\s*", arg):
            raise ScriptError(f"gs.{name}: {arg!r} is not an integer")
        arg = int(arg)
    if abs(arg) > MAX_ARGUMENT:
        raise ScriptError(f"gs.{name}: {arg} is out of range (at most {MAX_ARGUMENT})")
    return arg
