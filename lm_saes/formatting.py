"""How numbers read on the console: progress lines, the evaluation table, the sweep report."""

from __future__ import annotations

from typing import Any


def format_value(value: Any, float_spec: str = ".4g") -> str:
    """Whole numbers (ints, and floats such as a token count read back from JSON) with thousands separators,
    other floats by `float_spec`, None (an undefined score) as "undefined", anything else as str()."""
    if value is None:
        return "undefined"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:{float_spec}}"
    return str(value)
