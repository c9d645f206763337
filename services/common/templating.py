"""Step inputs reference the trigger and earlier steps with `{{ expression }}`; conditions, assertions (their
`expected` too) and extractions are expressions. An expression starting with `$` is JSONPath (RFC 9535), any other
JMESPath (schemas/expressions.py, docs/flows.md).

Pure functions over a context `{"trigger": …, "steps": {name: {"output", "status"}}, "vars": …, "run": …}`;
step inputs also see `secrets` (the names they reference: `***` when decide renders them, the values when the
step runner does; docs/secrets.md).
JMESPath (a well-kept, side-effect-free query language) rather than `eval`, so a flow definition
can never run code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult
from jsonpath import JSONPath, JSONPathError

from schemas.expressions import SECRET_REF as _SECRET_REF
from schemas.expressions import SPANS_TEMPLATES as _SPANS_TEMPLATES
from schemas.expressions import TEMPLATE as _TEMPLATE
from schemas.expressions import ExpressionError, compile_jsonpath, is_jsonpath, jsonpath_values
from schemas.flows import MASK


class TemplateError(ValueError):
    """A step's input, condition or assertion that cannot be evaluated; the step fails as VALIDATION."""


@lru_cache(maxsize=4096)
def _compile(expression: str) -> ParsedResult:
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        raise TemplateError(f"bad expression {expression!r}: {exc}") from exc


def _compile_jsonpath(expression: str) -> JSONPath:
    try:
        return compile_jsonpath(expression)
    except ExpressionError as exc:
        raise TemplateError(f"bad expression {expression!r}: {exc.reason}") from exc


def _nodes(expression: str, context: Any) -> list[Any]:
    try:
        return jsonpath_values(_compile_jsonpath(expression), context)
    except (JSONPathError, RecursionError) as exc:
        raise TemplateError(f"cannot evaluate {expression!r}: {exc}") from exc


def evaluate(expression: str, context: Any) -> Any:
    """The expression's value over `context`: JSONPath when it starts with `$` (one node: its value; several: a
    list of their values; none: null), else JMESPath."""
    if is_jsonpath(expression):
        nodes = _nodes(expression, context)
        return nodes[0] if len(nodes) == 1 else (nodes or None)
    try:
        return _compile(expression).search(context)
    except JMESPathError as exc:
        raise TemplateError(f"cannot evaluate {expression!r}: {exc}") from exc


def extract(expression: str, output: Any) -> Any:
    """An extraction's value over a step's output: as `evaluate`, except that a JSONPath matching no node is an
    error (the step fails `extraction_failed`); a JMESPath that finds nothing is null, as it always was."""
    if is_jsonpath(expression):
        nodes = _nodes(expression, output)
        if not nodes:
            raise TemplateError(f"{expression!r} matched nothing in the step's output")
        return nodes[0] if len(nodes) == 1 else nodes
    return evaluate(expression, output)


def render(value: Any, context: dict[str, Any], literal: Callable[[str], Any] | None = None) -> Any:
    """Replace `{{ expr }}` in every string; a string that is one whole template keeps the value's type.

    `literal`, when given, maps the text outside the templates (the step runner opens inline ciphertexts with
    it): only what the definition wrote, never what a template produced, so trigger data cannot smuggle a
    ciphertext or a `{{ secrets… }}` reference into being resolved."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip())
        if whole and not _SPANS_TEMPLATES.search(whole.group(1)):
            return evaluate(whole.group(1), context)
        if "{{" not in value:
            return value if literal is None else literal(value)
        if literal is None:
            return _TEMPLATE.sub(lambda m: _as_text(evaluate(m.group(1), context)), value)
        out, pos = [], 0
        for m in _TEMPLATE.finditer(value):
            out += [_as_text(literal(value[pos : m.start()])), _as_text(evaluate(m.group(1), context))]
            pos = m.end()
        out.append(_as_text(literal(value[pos:])))
        return "".join(out)
    if isinstance(value, dict):
        return {k: render(v, context, literal) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, context, literal) for v in value]
    return value


def secret_names(value: Any) -> frozenset[str]:
    """The secrets a step input references (`{{ secrets.NAME }}`, `{{ secrets."NAME" }}`, inside any expression)."""
    if isinstance(value, str):
        if "secrets" not in value or "{{" not in value:
            return frozenset()
        return frozenset(
            a or b for m in _TEMPLATE.finditer(value) for a, b in _SECRET_REF.findall(m.group(1))
        )  # fmt: skip
    if isinstance(value, dict):
        return frozenset().union(*(secret_names(v) for v in value.values()))
    if isinstance(value, list | tuple):
        return frozenset().union(*(secret_names(v) for v in value))
    return frozenset()


def with_secrets(context: dict[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """The context with `secrets` to render references from: the real values in the step runner, `***` for each
    name everywhere else (decide), so what the ledger records shows where a secret went, never its value."""
    return {**context, "secrets": dict(secrets)} if secrets else context


def masked_secrets(value: Any) -> dict[str, str]:
    """`***` for every secret `value` references."""
    return dict.fromkeys(secret_names(value), MASK)


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
