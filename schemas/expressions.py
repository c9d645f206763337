"""The expressions a flow definition holds, how each is compiled, and the check that runs when a version is published.

Two query languages (docs/flows.md):

- an expression that starts with `$` is JSONPath (RFC 9535, the `python-jsonpath` library in strict mode):
  `$.user.id`, `$.items[*].id`, `$..sku`, `$.items[?@.qty > 1]`;
- any other expression is JMESPath (`user.id`, `items[].id`, `length(items)`). A JMESPath expression can
  never start with `$` (no JMESPath token does), so the rule changes the meaning of no valid expression.

A definition holds expressions in: step input templates (`{{ expr }}` inside any string value of `input`, at any
depth), `run_condition`, each assertion's `expression` and the templates in its `expected`, each `extract` value,
and the literal JMESPath fields of a `sync_records` input (`key`, `mapping`, `filter`, `updated_at`,
`source.records_path`, `source.next_page_path`, `destination.id_path`). `expression_errors` compiles every one
of them the way the executor will evaluate it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jmespath
from jmespath import functions as jmespath_functions
from jmespath.exceptions import EmptyExpressionError, IncompleteExpressionError, JMESPathError, LexerError, ParseError
from jmespath.parser import ParsedResult
from jsonpath import JSONPath, JSONPathEnvironment, JSONPathError

if TYPE_CHECKING:
    from schemas.flows import StepDefinition

# `{{ expr }}` in a string; shared with the renderer (services/common/templating.py) so that what is checked at
# publish is exactly what is evaluated at run time.
TEMPLATE = re.compile(r"\{\{\s*(.+?)\s*\}\}")
# A whole-string match whose expression holds a `}}` followed by a `{{` spans several templates
# ('{{ a }}-{{ b }}' → 'a }}-{{ b'): that string is interpolated as text, not evaluated as one.
# A lone `}}` stays allowed, as in '{{ {a: {b: c}} }}' or a nested object literal.
SPANS_TEMPLATES = re.compile(r"\}\}.*\{\{")
# `secrets.NAME` or `secrets."NAME"` in an expression, not `x.secrets.NAME` or `steps.secrets…`.
SECRET_REF = re.compile(r"(?<![\w.\"'`@])secrets\s*\.\s*(?:([A-Za-z_][A-Za-z0-9_]*)|\"([^\"]+)\")")

_JSONPATH = JSONPathEnvironment(strict=True)
_FUNCTIONS = jmespath_functions.Functions().FUNCTION_TABLE


class ExpressionError(ValueError):
    """An expression that does not compile: `invalid JSONPath '$.user[': unexpected end of query`."""

    def __init__(self, syntax: str, expression: str, reason: str) -> None:
        super().__init__(f"invalid {syntax} {expression!r}: {reason}")
        self.syntax = syntax
        self.expression = expression
        self.reason = reason


def is_jsonpath(expression: str) -> bool:
    """JSONPath when it starts with `$` (leading blanks ignored), JMESPath otherwise."""
    return expression.lstrip().startswith("$")


@lru_cache(maxsize=4096)
def compile_jmespath(expression: str) -> ParsedResult:
    """The parsed expression; unknown functions and wrong argument counts are refused too (JMESPath itself
    finds those only when it evaluates)."""
    try:
        parsed = jmespath.compile(expression)
    except JMESPathError as exc:
        raise ExpressionError("JMESPath", expression, _jmespath_reason(exc)) from None
    for name, arity in _functions(parsed.parsed):
        signature = _FUNCTIONS.get(name, {}).get("signature")
        if signature is None:
            raise ExpressionError("JMESPath", expression, f"unknown function {name}()")
        variadic = bool(signature) and bool(signature[-1].get("variadic"))
        if arity < len(signature) if variadic else arity != len(signature):
            expected = f"at least {len(signature)}" if variadic else str(len(signature))
            raise ExpressionError("JMESPath", expression, f"{name}() takes {expected} argument(s), given {arity}")
    return parsed


@lru_cache(maxsize=4096)
def compile_jsonpath(expression: str) -> JSONPath:
    try:
        path = _JSONPATH.compile(expression.strip())
    except (JSONPathError, RecursionError) as exc:
        raise ExpressionError("JSONPath", expression, _jsonpath_reason(exc)) from None
    if not isinstance(path, JSONPath):  # a union or intersection of paths: the library's own, not RFC 9535
        raise ExpressionError("JSONPath", expression, "one query only (no `|` or `&` between paths)")
    return path


def compile_expression(expression: str) -> ParsedResult | JSONPath:
    """The expression compiled in its syntax (JSONPath when it starts with `$`, else JMESPath)."""
    return compile_jsonpath(expression) if is_jsonpath(expression) else compile_jmespath(expression)


def jsonpath_values(path: JSONPath, data: Any) -> list[Any]:
    """The values of the nodes `path` selects in `data`. A string is a value, never parsed as a JSON document
    (the library parses strings it is given as the document)."""
    if isinstance(data, str):
        return [data] if not path.segments else []
    return [match.obj for match in path.finditer(data)]


def template_expressions(text: str) -> list[str]:
    """The expressions the renderer evaluates in `text`: the whole string when it is one template, else each
    `{{ … }}` in it."""
    whole = TEMPLATE.fullmatch(text.strip())
    if whole and not SPANS_TEMPLATES.search(whole.group(1)):
        return [whole.group(1)]
    if "{{" not in text:
        return []
    return [m.group(1) for m in TEMPLATE.finditer(text)]


# ---------------------------------------------------------------- the check at publish


def expression_errors(steps: Sequence[StepDefinition]) -> list[str]:
    """Every expression of the steps that does not compile, each named by step and place:
    `steps[2] (fetch_user).extract.user_id: invalid JSONPath '$.user[': unexpected end of query`."""
    errors: list[str] = []
    for i, step in enumerate(steps):
        where = f"steps[{i}] ({step.name})"
        for place, expression in _step_expressions(step):
            try:
                compile_expression(expression)
            except ExpressionError as exc:
                errors.append(f"{where}.{place}: {exc}")
        for place, expression in _sync_paths(step):
            try:
                compile_jmespath(expression)  # sync_records evaluates its mapping with JMESPath only
            except ExpressionError as exc:
                errors.append(f"{where}.{place}: {exc}")
        for j, assertion in enumerate(step.assertions):
            for place, text in _strings(assertion.expected, f"assertions[{j}].expected"):
                if any(SECRET_REF.search(e) for e in template_expressions(text)):
                    errors.append(f"{where}.{place}: an assertion cannot compare with a secret (decide never sees "
                                  "their values)")  # fmt: skip
    return errors


def _step_expressions(step: StepDefinition) -> Iterator[tuple[str, str]]:
    for place, text in _strings(step.input, "input"):
        for expression in template_expressions(text):
            yield place, expression
    if step.run_condition is not None:
        yield "run_condition", step.run_condition
    for j, assertion in enumerate(step.assertions):
        yield f"assertions[{j}].expression", assertion.expression
        for place, text in _strings(assertion.expected, f"assertions[{j}].expected"):
            for expression in template_expressions(text):
                yield place, expression
    for var, expression in step.extract.items():
        yield f"extract.{var}", expression


def _sync_paths(step: StepDefinition) -> Iterator[tuple[str, str]]:
    """The JMESPath fields of a sync_records input written as literals (a templated one is checked as a template
    here and when the rendered input is validated at run time)."""
    if step.action != "sync_records":
        return
    inp = step.input
    found: list[tuple[str, Any]] = [("input.key", inp.get("key")), ("input.updated_at", inp.get("updated_at")),
                                    ("input.filter", inp.get("filter"))]  # fmt: skip
    mapping = inp.get("mapping")
    if isinstance(mapping, dict):
        found += [(f"input.mapping.{field}", expression) for field, expression in mapping.items()]
    for part, keys in (("source", ("records_path", "next_page_path")), ("destination", ("id_path",))):
        section = inp.get(part)
        if isinstance(section, dict) and section.get("kind", "http") == "http":
            found += [(f"input.{part}.{key}", section.get(key)) for key in keys]
    for place, expression in found:
        if isinstance(expression, str) and "{{" not in expression:
            yield place, expression


def _strings(value: Any, place: str) -> Iterator[tuple[str, str]]:
    """Every string value inside `value` (not keys: the renderer leaves keys as written), with its place."""
    if isinstance(value, str):
        yield place, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{place}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, f"{place}[{i}]")


def _functions(node: Any) -> Iterator[tuple[str, int]]:
    """(name, argument count) of every function call in a parsed JMESPath AST."""
    if isinstance(node, dict):
        if node.get("type") == "function_expression":
            yield node["value"], len(node.get("children", ()))
        for child in node.get("children", ()):  # sub-expressions are children only; a `value` is a name or literal
            yield from _functions(child)


def _jmespath_reason(exc: JMESPathError) -> str:
    if isinstance(exc, LexerError):
        return f"{exc.message} at offset {exc.lexer_position}"
    if isinstance(exc, IncompleteExpressionError):
        return "incomplete expression"
    if isinstance(exc, ParseError):
        return f"{exc.msg} at offset {exc.lex_position}"
    if isinstance(exc, EmptyExpressionError):
        return "empty expression"
    return str(exc).splitlines()[0]


def _jsonpath_reason(exc: Exception) -> str:
    reason = str(exc.args[0]) if exc.args else type(exc).__name__
    token = getattr(exc, "token", None)
    return f"{reason} at offset {token.index}" if token is not None and token.index >= 0 else reason
