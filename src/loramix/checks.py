"""Small value checks shared by every module that reads user input: integers, finite numbers, JSON objects."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object; unreadable, non-UTF-8, invalid JSON or another JSON type is a ValueError
    naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def is_int(v: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never a count or a size to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """A finite int or float (not a bool, NaN, an infinity or an int beyond float range)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False
