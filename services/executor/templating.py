"""Step inputs reference the trigger and earlier steps with `{{ JMESPath }}`; conditions and assertions too.

Pure functions over a context `{"trigger": …, "steps": {name: {"output", "status"}}, "vars": …, "run": …}`.
JMESPath (a well-kept, side-effect-free query language) rather than `eval`, so a flow definition
can never run code.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

_TEMPLATE = re.compile(r"\{\{\s*(.+?)\s*\}\}")
# A whole-string match whose expression holds a `}}` followed by a `{{` spans several templates
# ('{{ a }}-{{ b }}' → 'a }}-{{ b'): that string is interpolated as text, not evaluated as one.
# A lone `}}` stays allowed, as in '{{ {a: {b: c}} }}' or a nested object literal.
_SPANS_TEMPLATES = re.compile(r"\}\}.*\{\{")


class TemplateError(ValueError):
    """A step's input, condition or assertion that cannot be evaluated; the step fails as VALIDATION."""


@lru_cache(maxsize=4096)
def _compile(expression: str) -> ParsedResult:
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        raise TemplateError(f"bad expression {expression!r}: {exc}") from exc


def evaluate(expression: str, context: Any) -> Any:
    try:
        return _compile(expression).search(context)
    except JMESPathError as exc:
        raise TemplateError(f"cannot evaluate {expression!r}: {exc}") from exc


def render(value: Any, context: dict[str, Any]) -> Any:
    """Replace `{{ expr }}` in every string; a string that is one whole template keeps the value's type."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip())
        if whole and not _SPANS_TEMPLATES.search(whole.group(1)):
            return evaluate(whole.group(1), context)
        if "{{" not in value:
            return value
        return _TEMPLATE.sub(lambda m: _as_text(evaluate(m.group(1), context)), value)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, context) for v in value]
    return value


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    import orjson

    return orjson.dumps(value).decode()


def truthy(value: Any) -> bool:
    """JMESPath truthiness: empty list/object/string, false and null are false; every number is true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | tuple | dict):
        return len(value) > 0
    return True


def check(operator: str, actual: Any, expected: Any) -> bool:
    try:
        match operator:
            case "eq":
                return bool(actual == expected)
            case "ne":
                return bool(actual != expected)
            case "gt":
                return bool(actual > expected)
            case "gte":
                return bool(actual >= expected)
            case "lt":
                return bool(actual < expected)
            case "lte":
                return bool(actual <= expected)
            case "contains":
                return expected in actual
            case "exists":
                return actual is not None
    except TypeError:
        return False
    return False
