"""Built-in tools that are safe anywhere: arithmetic, date/time with time zones, unit conversion.

What it owns: the functions themselves (typed and documented, so the registry
derives their schemas) and ``builtin_registry``, which registers them together
with the local-file search of tools/files.py when it is given folders.

Invariants
- ``calculator`` never evaluates text as Python: it parses with ``ast`` and
  walks only number literals and arithmetic operators; names, calls,
  attributes, subscripts, strings and everything else are refused. Sizes are
  bounded (expression length, node count, exponent, integer bits) so no
  input can make it spin or eat memory.
- Invalid input raises ``ValueError`` with a message meant for the model (the
  registry turns it into the tool result).
"""

from __future__ import annotations

import ast
import math
import operator
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agentloop.tools.registry import ToolRegistry

# ---------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 256
MAX_NODES = 128
MAX_EXPONENT = 1_000
MAX_INT_BITS = 4_096  # ~1233 decimal digits: far beyond any arithmetic question

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOLS = {"×": "*", "·": "*", "÷": "/", "−": "-", "^": "**"}  # how people write arithmetic


def _bits(x: int | float) -> int:
    return abs(x).bit_length() if isinstance(x, int) else 0


def _check_size(x: int | float) -> int | float:
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError("the result is too large (not a finite number)")
    if isinstance(x, int) and _bits(x) > MAX_INT_BITS:
        raise ValueError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    return x


def _binop(op: ast.operator, a: int | float, b: int | float) -> int | float:
    if isinstance(op, ast.Pow):
        if abs(b) > MAX_EXPONENT:
            raise ValueError(f"the exponent {b} is too large (at most {MAX_EXPONENT})")
        # Predict the size before computing: 9**999 is cheap, (10**300)**999 is not.
        if isinstance(a, int) and isinstance(b, int) and b > 0 and _bits(a) * b > MAX_INT_BITS:
            raise ValueError(f"the result is too large (more than {MAX_INT_BITS} bits)")
        if a == 0 and b < 0:
            raise ValueError("division by zero (0 to a negative power)")
    elif isinstance(op, ast.Mult) and _bits(a) + _bits(b) > MAX_INT_BITS:
        raise ValueError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    try:
        out = _BINOPS[type(op)](a, b)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("the result is too large") from None
    if isinstance(out, complex):  # (-8) ** 0.5
        raise ValueError("the result is not a real number")
    return _check_size(out)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        v = node.value
        # bool is an int subclass; complex literals (1j) are not arithmetic we offer.
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return _check_size(v)
        raise ValueError(f"only numbers are allowed, not {v!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _binop(node.op, _eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    what = f"'{type(node).__name__}'"
    if isinstance(node, ast.Name):
        what = f"the name '{node.id}'"
    elif isinstance(node, ast.Attribute):
        what = "attribute access"
    elif isinstance(node, ast.Call):
        what = "a function call"
    raise ValueError(f"{what} is not allowed; use numbers, + - * / // % ** and parentheses")


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely (see the module invariants)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.strip()
    for sym, py in _SYMBOLS.items():
        text = text.replace(sym, py)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"'{expression}' is not an arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ValueError(f"the expression has more than {MAX_NODES} parts")
    value = _eval(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 12/4 reads better as 3 than 3.0
    return value


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression.

    Args:
        expression: e.g. 2*(3+4); numbers, + - * / // % ** and parentheses only
    """
    return evaluate(expression)


# ---------------------------------------------------------------- date and time

def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"unknown time zone '{name}'; use an IANA name such as Europe/Paris or UTC") from None


def _describe(dt: datetime, zone_name: str) -> dict[str, Any]:
    return {"timezone": zone_name, "datetime": dt.isoformat(timespec="seconds"), "date": dt.date().isoformat(),
            "time": dt.strftime("%H:%M:%S"), "weekday": dt.strftime("%A"), "utc_offset": dt.strftime("%z")}


def current_time(timezone: str = "UTC") -> dict[str, Any]:
    """Get the current date and time in a time zone.

    Args:
        timezone: IANA time zone name, e.g. Europe/Paris, America/New_York or UTC
    """
    zone = _zone(timezone)
    return _describe(datetime.now(zone), zone.key)


def convert_time(time: str, to_timezone: str, from_timezone: str = "UTC") -> dict[str, Any]:
    """Convert a date and time from one time zone to another.

    Args:
        time: ISO 8601 date and time, e.g. 2024-05-01T14:30; an offset in it wins over from_timezone
        to_timezone: IANA time zone to convert to, e.g. Asia/Tokyo
        from_timezone: IANA time zone the time is in when it has no offset
    """
    try:
        dt = datetime.fromisoformat(time.strip())
    except ValueError:
        raise ValueError(f"'{time}' is not an ISO 8601 date and time (e.g. 2024-05-01T14:30)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_zone(from_timezone))
    target = _zone(to_timezone)
    return _describe(dt.astimezone(target), target.key)


# ---------------------------------------------------------------- units

# unit → (dimension, factor to the dimension's base unit). Temperatures are affine: below.
_UNITS: dict[str, tuple[str, float]] = {}


def _add(dimension: str, factor: float, *names: str) -> None:
    for n in names:
        _UNITS[n] = (dimension, factor)


_add("length", 1.0, "m", "meter", "meters", "metre", "metres")
_add("length", 1e3, "km", "kilometer", "kilometers", "kilometre", "kilometres")
_add("length", 1e-2, "cm", "centimeter", "centimeters", "centimetre", "centimetres")
_add("length", 1e-3, "mm", "millimeter", "millimeters", "millimetre", "millimetres")
_add("length", 1609.344, "mi", "mile", "miles")
_add("length", 0.9144, "yd", "yard", "yards")
_add("length", 0.3048, "ft", "foot", "feet")
_add("length", 0.0254, "in", "inch", "inches")
_add("length", 1852.0, "nmi", "nautical mile", "nautical miles")
_add("mass", 1.0, "kg", "kilogram", "kilograms")
_add("mass", 1e-3, "g", "gram", "grams")
_add("mass", 1e-6, "mg", "milligram", "milligrams")
_add("mass", 1e3, "t", "tonne", "tonnes", "metric ton")
_add("mass", 0.45359237, "lb", "lbs", "pound", "pounds")
_add("mass", 0.028349523125, "oz", "ounce", "ounces")
_add("mass", 6.35029318, "st", "stone", "stones")
_add("time", 1.0, "s", "sec", "second", "seconds")
_add("time", 1e-3, "ms", "millisecond", "milliseconds")
_add("time", 60.0, "min", "minute", "minutes")
_add("time", 3600.0, "h", "hr", "hour", "hours")
_add("time", 86400.0, "d", "day", "days")
_add("time", 604800.0, "wk", "week", "weeks")
_add("volume", 1.0, "l", "liter", "liters", "litre", "litres")
_add("volume", 1e-3, "ml", "milliliter", "milliliters", "millilitre", "millilitres")
_add("volume", 1e3, "m3", "cubic meter", "cubic meters")
_add("volume", 3.785411784, "gal", "gallon", "gallons", "us gallon", "us gallons")
_add("volume", 0.946352946, "qt", "quart", "quarts")
_add("volume", 0.473176473, "pt", "pint", "pints")
_add("volume", 0.2365882365, "cup", "cups")
_add("volume", 0.0295735295625, "fl oz", "fluid ounce", "fluid ounces")
_add("speed", 1.0, "m/s", "meters per second")
_add("speed", 1 / 3.6, "km/h", "kph", "kmh", "kilometers per hour")
_add("speed", 0.44704, "mph", "miles per hour")
_add("speed", 1852 / 3600, "kn", "knot", "knots")
_add("area", 1.0, "m2", "square meter", "square meters")
_add("area", 1e6, "km2", "square kilometer", "square kilometers")
_add("area", 1e4, "ha", "hectare", "hectares")
_add("area", 4046.8564224, "acre", "acres")
_add("area", 0.09290304, "ft2", "square foot", "square feet")
_add("data", 1.0, "b", "byte", "bytes")
_add("data", 1e3, "kb", "kilobyte", "kilobytes")
_add("data", 1e6, "mb", "megabyte", "megabytes")
_add("data", 1e9, "gb", "gigabyte", "gigabytes")
_add("data", 1e12, "tb", "terabyte", "terabytes")
_add("data", 2.0**10, "kib", "kibibyte", "kibibytes")
_add("data", 2.0**20, "mib", "mebibyte", "mebibytes")
_add("data", 2.0**30, "gib", "gibibyte", "gibibytes")
_add("energy", 1.0, "j", "joule", "joules")
_add("energy", 1e3, "kj", "kilojoule", "kilojoules")
_add("energy", 4.184, "cal", "calorie", "calories")
_add("energy", 4184.0, "kcal", "kilocalorie", "kilocalories")
_add("energy", 3.6e6, "kwh", "kilowatt hour", "kilowatt hours")

# Temperatures: (scale, offset) with kelvin = value * scale + offset.
_TEMPERATURES = {}
for _names, _conv in ((("c", "°c", "celsius"), (1.0, 273.15)),
                      (("f", "°f", "fahrenheit"), (5 / 9, 273.15 - 32 * 5 / 9)),
                      (("k", "kelvin"), (1.0, 0.0))):
    for _n in _names:
        _TEMPERATURES[_n] = _conv


def _unit_key(unit: str) -> str:
    return " ".join(unit.strip().lower().replace("degrees ", "").split())


def unit_dimension(unit: str) -> str:
    key = _unit_key(unit)
    if key in _TEMPERATURES:
        return "temperature"
    if key in _UNITS:
        return _UNITS[key][0]
    raise ValueError(f"unknown unit '{unit}'")


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert a quantity between units of length, mass, time, volume, speed, area, data, energy or temperature.

    Args:
        value: the quantity to convert, e.g. 3.5
        from_unit: the unit it is in, e.g. km, lb, fahrenheit, GB
        to_unit: the unit to convert to, e.g. mi, kg, celsius, MiB
    """
    a, b = _unit_key(from_unit), _unit_key(to_unit)
    da, db = unit_dimension(from_unit), unit_dimension(to_unit)
    if da != db:
        raise ValueError(f"cannot convert {da} ({from_unit}) to {db} ({to_unit})")
    if da == "temperature":
        (sa, oa), (sb, ob) = _TEMPERATURES[a], _TEMPERATURES[b]
        kelvin = value * sa + oa
        if kelvin < -1e-9:
            raise ValueError(f"{value} {from_unit} is below absolute zero")
        result = (kelvin - ob) / sb
    else:
        result = value * _UNITS[a][1] / _UNITS[b][1]
    if not math.isfinite(result):
        raise ValueError("the result is not a finite number")
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": round(result, 10),
            "dimension": da}


# ---------------------------------------------------------------- the default registry

def builtin_registry(search_roots: Iterable[str | Path] | None = None, *, timeout: float = 5.0) -> ToolRegistry:
    """A registry with the built-in tools; ``search_files``/``read_text_file`` too when given folders."""
    reg = ToolRegistry(default_timeout=timeout)
    for fn in (calculator, current_time, convert_time, convert_units):
        reg.register(fn)
    roots = list(search_roots or [])
    if roots:
        from agentloop.tools.files import FileSearch

        fs = FileSearch(roots)
        reg.register(fs.search_files, name="search_files")
        reg.register(fs.read_text_file, name="read_text_file")
    return reg
