"""`{{ JMESPath }}` templates in step inputs, conditions and assertions: values, types and clear errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.templating import TemplateError, check, evaluate, render, truthy

CTX: dict[str, Any] = {
    "trigger": {"order_id": "SO-1", "total": 1250, "ratio": 0.5, "paid": True, "items": [{"sku": "a"}, {"sku": "b"}],
                "note": None, "empty": []},
    "steps": {"fetch": {"output": {"status": 200, "body": {"token": "abc"}}, "status": "SUCCEEDED"}},
    "vars": {"token": "abc"},
    "run": {"id": "run-1", "flow_id": "orders", "flow_version": 3},
}  # fmt: skip

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
)


# ---------------------------------------------------------------- render


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("{{ trigger.total }}", 1250),
        ("{{trigger.ratio}}", 0.5),
        ("{{ trigger.paid }}", True),
        ("{{ trigger.note }}", None),
        ("{{ trigger.items }}", [{"sku": "a"}, {"sku": "b"}]),
        ("{{ trigger.items[].sku }}", ["a", "b"]),
        ("{{ steps.fetch.output.body }}", {"token": "abc"}),
        ("  {{ vars.token }}  ", "abc"),
        ("{{ trigger.missing }}", None),
        ("{{ trigger.missing || 'USD' }}", "USD"),
        ("{{ length(trigger.items) }}", 2),
        ("{{ run.flow_version }}", 3),
    ],
)
def test_a_whole_string_template_keeps_the_values_type(template: str, value: Any) -> None:
    assert render(template, CTX) == value


@pytest.mark.parametrize(
    ("template", "text"),
    [
        ("order {{ trigger.order_id }}", "order SO-1"),
        ("Bearer {{vars.token}}", "Bearer abc"),
        ("total={{ trigger.total }} paid={{ trigger.paid }}", "total=1250 paid=true"),
        ("note=[{{ trigger.note }}]", "note=[]"),
        ("skus: {{ trigger.items[].sku }}", 'skus: ["a","b"]'),
        ("{{ trigger.order_id }}/{{ run.id }} done", "SO-1/run-1 done"),
        ("no templates here", "no templates here"),
        ("a {{ lone brace", "a {{ lone brace"),
    ],
)
def test_templates_inside_text_are_interpolated_as_text(template: str, text: str) -> None:
    assert render(template, CTX) == text


@pytest.mark.parametrize(
    ("template", "text"),
    [("{{ trigger.order_id }}-{{ run.id }}", "SO-1-run-1"), ("{{ trigger.total }}{{ trigger.total }}", "12501250")],
)
def test_a_string_made_of_two_templates_is_interpolated(template: str, text: str) -> None:
    assert render(template, CTX) == text


def test_render_walks_dicts_and_lists_and_leaves_other_values_alone() -> None:
    value = {
        "url": "https://api.example.com/orders/{{ trigger.order_id }}",
        "body": {"total": "{{ trigger.total }}", "skus": ["{{ trigger.items[0].sku }}", "x"]},
        "pair": ("{{ trigger.paid }}", 1),
        "n": 5, "f": 1.5, "b": False, "none": None,
    }  # fmt: skip
    assert render(value, CTX) == {
        "url": "https://api.example.com/orders/SO-1",
        "body": {"total": 1250, "skus": ["a", "x"]},
        "pair": [True, 1],
        "n": 5, "f": 1.5, "b": False, "none": None,
    }  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_a_whole_template_returns_exactly_the_value_it_points_at(value: Any) -> None:
    assert render("{{ trigger.x }}", {"trigger": {"x": value}}) == value


@settings(max_examples=200, deadline=None)
@given(value=json_values.filter(lambda v: not (isinstance(v, str) and "{{" in v)))
def test_values_without_templates_render_to_themselves(value: Any) -> None:
    assert render(value, CTX) == value


@settings(max_examples=200, deadline=None)
@given(prefix=st.text().filter(lambda s: "{" not in s and "}" not in s).map(lambda s: "<" + s),
       value=json_scalars)  # fmt: skip
def test_text_interpolation_writes_strings_bare_and_other_values_as_json(prefix: str, value: Any) -> None:
    expected = "" if value is None else value if isinstance(value, str) else orjson.dumps(value).decode()
    assert render(prefix + "{{ trigger.x }}", {"trigger": {"x": value}}) == prefix + expected


def test_render_does_not_change_its_input() -> None:
    value = {"a": ["{{ trigger.total }}"]}
    render(value, CTX)
    assert value == {"a": ["{{ trigger.total }}"]}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("template", ["{{ trigger.[ }}", "x {{ trigger..total }}", "{{ foo( }}", "{{ 'unterminated }}"])
def test_a_bad_expression_is_a_template_error_naming_it(template: str) -> None:
    with pytest.raises(TemplateError, match="bad expression") as info:
        render(template, CTX)
    inner = template.split("{{")[1].split("}}")[0].strip()
    assert repr(inner) in str(info.value)


def test_an_expression_that_fails_at_run_time_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match=r"cannot evaluate 'length\(trigger.total\)'"):
        render("{{ length(trigger.total) }}", CTX)
    with pytest.raises(TemplateError, match="cannot evaluate"):
        evaluate("unknown_function(@)", CTX)


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


# ---------------------------------------------------------------- evaluate, truthy, check


def test_evaluate_is_plain_jmespath_over_any_value() -> None:
    assert evaluate("status", {"status": 200}) == 200
    assert evaluate("[0]", [7, 8]) == 7
    assert evaluate("@", "text") == "text"
    assert evaluate("a.b.c", {}) is None


@pytest.mark.parametrize("value", [None, False, "", [], {}])
def test_falsy_values(value: Any) -> None:
    assert truthy(value) is False


@pytest.mark.parametrize("value", [True, 1, -1, 0.5, "x", " ", [0], {"a": None}, "false"])
def test_truthy_values(value: Any) -> None:
    assert truthy(value) is True


@pytest.mark.parametrize("value", [0, 0.0])
def test_zero_is_truthy_as_in_jmespath(value: Any) -> None:
    assert evaluate("!!@", value) is True  # what JMESPath itself says
    assert truthy(value) is True


@pytest.mark.parametrize(
    ("operator", "actual", "expected", "result"),
    [
        ("eq", 200, 200, True), ("eq", 200, 201, False), ("eq", "a", "a", True), ("eq", None, None, True),
        ("eq", {"a": [1]}, {"a": [1]}, True), ("ne", 1, 2, True), ("ne", 1, 1, False),
        ("gt", 3, 2, True), ("gt", 2, 2, False), ("gte", 2, 2, True), ("lt", 1.5, 2, True), ("lte", 3, 2, False),
        ("contains", ["x", "y"], "x", True), ("contains", "hello", "ell", True), ("contains", {"k": 1}, "k", True),
        ("contains", ["x"], "z", False),
        ("exists", 0, None, True), ("exists", False, None, True), ("exists", None, None, False),
    ],
)  # fmt: skip
def test_assertion_operators(operator: str, actual: Any, expected: Any, result: bool) -> None:
    assert check(operator, actual, expected) is result


@pytest.mark.parametrize(
    ("operator", "actual", "expected"),
    [("gt", None, 1), ("lt", "a", 1), ("gte", [1], 1), ("contains", None, "x"), ("contains", 5, 5),
     ("contains", "abc", 1), ("bogus", 1, 1)],
)  # fmt: skip
def test_mismatched_types_or_unknown_operators_fail_the_assertion_without_raising(
    operator: str, actual: Any, expected: Any
) -> None:
    assert check(operator, actual, expected) is False
