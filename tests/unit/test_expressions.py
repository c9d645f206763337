"""Expressions in flow definitions: every one compiled when a version is published (a clear error naming the step
and the expression), JSONPath next to JMESPath, templated assertion `expected`; published versions still load."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas import codec
from schemas.events import FlowVersionPublished
from schemas.expressions import ExpressionError, compile_expression, expression_errors, is_jsonpath
from schemas.flows import STORED_FLOW, FlowDefinition
from services.common.templating import TemplateError, evaluate, extract
from tests.unit.drive import Run, make_flow, make_stored_flow, make_trigger


def flow(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"id": "users", "tenant_id": "t1", "name": "Users", "version": 1,
            "steps": [{"action": "transform", **s} for s in steps]}  # fmt: skip


def refusal(*steps: dict[str, Any]) -> str:
    """The one error message a definition with these steps is refused with."""
    with pytest.raises(ValidationError) as info:
        FlowDefinition.model_validate(flow(*steps))
    errors = info.value.errors()
    assert len(errors) == 1 and errors[0]["loc"] == ("steps",) and errors[0]["type"] == "flow_expression"
    return str(errors[0]["msg"])


FETCH = {"name": "create", "action": "http_request", "input": {"url": "https://example.com/users"}}


# ---------------------------------------------------------------- which syntax


@pytest.mark.parametrize(
    ("expression", "jsonpath"),
    [("$.user.id", True), ("  $..id", True), ("$", True), ("user.id", False), ("@", False), ("`\"$\"`", False),
     ("length(items)", False)],
)  # fmt: skip
def test_an_expression_starting_with_dollar_is_jsonpath(expression: str, jsonpath: bool) -> None:
    assert is_jsonpath(expression) is jsonpath


@pytest.mark.parametrize(
    "expression",
    ["$.user.id", "$.items[*].id", "$..sku", "$.items[?@.qty > 1].sku", "$['odd key']", "$.items[0:2]",
     "$[?length(@.tags) > 0]", "user.id", "items[].id", "length(items)", "{id: id, n: `1`}", "sort_by(@, &n)",
     "merge(a, b, c)", "not_null(a, b)"],
)  # fmt: skip
def test_valid_expressions_compile(expression: str) -> None:
    compile_expression(expression)


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("$.user[", "invalid JSONPath '$.user[': unexpected end of query"),
        ("$.user.", "invalid JSONPath '$.user.'"),
        ("$.a | $.b", "invalid JSONPath '$.a | $.b'"),
        ("$[?nosuch(@.a)]", "function 'nosuch' is not defined"),
        ("user.[", "invalid JMESPath 'user.[': incomplete expression"),
        ("a b", "invalid JMESPath 'a b'"),
        ("", "invalid JMESPath '': empty expression"),
        ("lenght(items)", "invalid JMESPath 'lenght(items)': unknown function lenght()"),
        ("length(a, b)", "length() takes 1 argument(s), given 2"),
        ("not_null()", "not_null() takes at least 1 argument(s), given 0"),
        ("sort_by(@, &length(a, b))", "length() takes 1 argument(s)"),
    ],
)
def test_invalid_expressions_are_refused_saying_why(expression: str, says: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(expression)
    assert says in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the check at publish, every kind of expression


def test_a_flow_of_valid_expressions_of_every_kind_is_accepted() -> None:
    FlowDefinition.model_validate(flow(
        {**FETCH, "extract": {"user_id": "$.body.id", "names": "body.items[].name"},
         "assertions": [{"expression": "status", "expected": 201}, {"expression": "$.body.id", "operator": "exists"}]},
        {"name": "fetch", "action": "http_request", "run_condition": "$.vars.user_id",
         "input": {"url": "https://example.com/users/{{ vars.user_id }}", "headers": {"X-Trace": "{{ $.run.id }}"},
                   "tags": ["{{ trigger.tag }}", "plain {{ not closed"]},
         "assertions": [{"expression": "$.body.id", "expected": "{{ vars.user_id }}"},
                        {"expression": "body",
                         "expected": {"id": "{{ vars.user_id }}", "names": ["{{ vars.names[0] }}"]}}]},
    ))  # fmt: skip


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"extract": {"user_id": "$.user["}},
         "steps[1] (fetch_user).extract.user_id: invalid JSONPath '$.user[': unexpected end of query"),
        ({"extract": {"user_id": "user.["}},
         "steps[1] (fetch_user).extract.user_id: invalid JMESPath 'user.[': incomplete expression"),
        ({"run_condition": "vars.[ok"}, "steps[1] (fetch_user).run_condition: invalid JMESPath 'vars.[ok'"),
        ({"run_condition": "$.vars["}, "steps[1] (fetch_user).run_condition: invalid JSONPath '$.vars['"),
        ({"assertions": [{"expression": "status"}, {"expression": "body.[", "expected": 1}]},
         "steps[1] (fetch_user).assertions[1].expression: invalid JMESPath 'body.['"),
        ({"assertions": [{"expression": "$.body[", "expected": 1}]},
         "steps[1] (fetch_user).assertions[0].expression: invalid JSONPath '$.body['"),
        ({"assertions": [{"expression": "body.id", "expected": "{{ vars.[ }}"}]},
         "steps[1] (fetch_user).assertions[0].expected: invalid JMESPath 'vars.['"),
        ({"assertions": [{"expression": "body", "expected": {"ids": ["{{ $.vars[ }}"]}}]},
         "steps[1] (fetch_user).assertions[0].expected.ids[0]: invalid JSONPath '$.vars['"),
        ({"input": {"url": "https://x.example/{{ vars.[ }}"}},
         "steps[1] (fetch_user).input.url: invalid JMESPath 'vars.['"),
        ({"input": {"body": {"items": [{"id": "{{ lenght(vars.ids) }}"}]}}},
         "steps[1] (fetch_user).input.body.items[0].id: invalid JMESPath 'lenght(vars.ids)': unknown function"),
        ({"input": {"auth": "Bearer {{ secrets.TOKEN }} {{ $.vars.x[ }}"}},
         "steps[1] (fetch_user).input.auth: invalid JSONPath '$.vars.x['"),
        ({"assertions": [{"expression": "body.token", "expected": "{{ secrets.TOKEN }}"}]},
         "steps[1] (fetch_user).assertions[0].expected: an assertion cannot compare with a secret"),
    ],
)  # fmt: skip
def test_each_kind_of_bad_expression_is_refused_naming_the_step_and_the_expression(
    step: dict[str, Any], message: str
) -> None:
    assert message in refusal(FETCH, {"name": "fetch_user", **step})


def test_every_bad_expression_is_listed_not_only_the_first() -> None:
    message = refusal(
        {"name": "a", "run_condition": "x.["},
        {"name": "b", "extract": {"id": "$.id[", "ok": "id"}, "input": {"x": "{{ y.[ }}"}},
    )
    assert message.count("; ") == 2
    assert message.startswith("steps[0] (a).run_condition: invalid JMESPath 'x.['")
    assert "steps[1] (b).input.x: invalid JMESPath 'y.['" in message
    assert "steps[1] (b).extract.id: invalid JSONPath '$.id['" in message


def test_sync_records_mapping_paths_are_jmespath_checked_at_publish() -> None:
    sync = {"name": "sync", "action": "sync_records", "input": {
        "source": {"kind": "http", "url": "https://shop.example/orders", "records_path": "orders[",
                   "next_page_path": "{{ vars.next }}"},
        "destination": {"kind": "http", "url": "https://erp.example/orders", "id_path": "$.id"},
        "key": "id", "mapping": {"email": "customer.email", "total": "to_number(total_price"},
    }}  # fmt: skip
    message = refusal(sync)
    assert "steps[0] (sync).input.source.records_path: invalid JMESPath 'orders['" in message
    assert "steps[0] (sync).input.destination.id_path: invalid JMESPath '$.id'" in message  # sync maps with JMESPath
    assert "steps[0] (sync).input.mapping.total: invalid JMESPath 'to_number(total_price'" in message
    assert "mapping.email" not in message and "next_page_path" not in message


def test_text_that_only_looks_like_templates_is_left_alone() -> None:
    # Only `{{ … }}` values are rendered: dict keys and an unclosed `{{` stay text, as the renderer leaves them.
    FlowDefinition.model_validate(flow({"name": "a", "input": {"{{ not.[ }}": 1, "note": "{{ open", "x": "}} {{"}}))


def test_the_refusal_reads_as_one_line_through_the_apis_error_formatting() -> None:
    with pytest.raises(ValidationError) as info:
        FlowDefinition.model_validate(flow(FETCH, {"name": "fetch_user", "extract": {"user_id": "$.user["}}))
    first = info.value.errors()[0]
    # services/api/routes/flows.py::_first_error: "{loc}: {msg}"
    assert f"{'.'.join(map(str, first['loc']))}: {first['msg']}" == (
        "steps: steps[1] (fetch_user).extract.user_id: invalid JSONPath '$.user[': unexpected end of query"
    )


def test_expression_errors_of_a_valid_flow_is_empty() -> None:
    assert expression_errors(make_flow({"name": "a", "extract": {"x": "$.x"}}).steps) == []


# ---------------------------------------------------------------- versions already published still load


BAD = ({"name": "a", "run_condition": "x.[", "extract": {"id": "$.id["}, "input": {"u": "{{ y.[ }}"},
        "assertions": [{"expression": "$.s[", "expected": "{{ z.[ }}"}]},)  # fmt: skip


def test_a_published_version_with_expressions_refused_today_still_decodes_from_the_flows_topic() -> None:
    with pytest.raises(ValidationError):
        FlowDefinition.model_validate(flow(*BAD))
    stored = FlowDefinition.model_validate(flow(*BAD), context=STORED_FLOW)
    published = FlowVersionPublished(tenant_id="t1", flow_id="users", flow_version=1, flow=stored)
    decoded = codec.decode_flow_event(codec.dumps(published))
    assert isinstance(decoded, FlowVersionPublished) and decoded.flow == stored
    # The same bytes as an old producer wrote them (a plain dict, never through today's model).
    raw = {"type": "FlowVersionPublished", "tenant_id": "t1", "flow_id": "users", "flow_version": 1,
           "flow": flow(*BAD)}  # fmt: skip
    assert codec.decode_flow_event(codec.dumps(raw)).flow.steps[0].extract == {"id": "$.id["}  # type: ignore[attr-defined]


def test_the_stored_context_relaxes_only_the_expression_check() -> None:
    with pytest.raises(ValidationError, match="step names must be unique"):
        FlowDefinition.model_validate(flow({"name": "a"}, {"name": "a"}), context=STORED_FLOW)
    with pytest.raises(ValidationError):
        FlowDefinition.model_validate({**flow({"name": "a"}), "version": 0}, context=STORED_FLOW)


def test_a_published_version_with_a_bad_extraction_fails_only_the_run_that_reaches_it() -> None:
    run = Run(make_stored_flow({"name": "a", "extract": {"id": "$.id["}}))
    run.start()
    run.complete(output={"id": 1})
    failed = run.of_type("StepFailed")[0].payload
    assert failed.error.code == "extraction_failed" and "$.id[" in failed.error.message
    assert run.types[-1] == "RunFailed"


# ---------------------------------------------------------------- JSONPath at run time

USER = {"status": 200, "body": {"id": "u-7", "roles": [{"name": "admin"}, {"name": "dev"}], "tags": ["x"]}}


def test_a_jsonpath_extraction_of_one_node_is_its_value_several_a_list() -> None:
    assert extract("$.body.id", USER) == "u-7"
    assert extract("$.body.roles[*].name", USER) == ["admin", "dev"]
    assert extract("$.body.tags[*]", USER) == "x"  # one node: its value, even from a wildcard
    assert extract("$..name", USER) == ["admin", "dev"]
    assert extract("$.body.roles[?@.name == 'dev']", USER) == {"name": "dev"}
    assert extract("$.body", {"body": None}) is None  # a node whose value is null is a match


def test_a_jsonpath_extraction_matching_nothing_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"'\$.body.email' matched nothing"):
        extract("$.body.email", USER)
    # JMESPath keeps its meaning: a missing field is null
    assert extract("body.email", USER) is None


def test_jsonpath_over_a_string_does_not_parse_it_as_json() -> None:
    assert extract("$", '{"a": 1}') == '{"a": 1}'
    with pytest.raises(TemplateError):
        extract("$.a", '{"a": 1}')


def test_evaluate_takes_jsonpath_too_null_when_nothing_matches() -> None:
    context = {"vars": {"user_id": "u-7"}, "trigger": {"items": [1, 2]}}
    assert evaluate("$.vars.user_id", context) == "u-7"
    assert evaluate("$.trigger.items[*]", context) == [1, 2]
    assert evaluate("$.vars.missing", context) is None


def test_jsonpath_extractions_feed_later_steps_and_jsonpath_runs_conditions_and_assertions() -> None:
    run = Run(make_flow(
        {"name": "create", "extract": {"user_id": "$.body.id", "roles": "$.body.roles[*].name"},
         "assertions": [{"expression": "$.status", "expected": 200}]},
        {"name": "fetch", "run_condition": "$.vars.user_id", "input": {"url": "/users/{{ $.vars.user_id }}"}},
    ))  # fmt: skip
    run.start()
    run.complete(output=USER)
    ok = run.of_type("StepSucceeded")[0].payload
    assert ok.extractions == {"user_id": "u-7", "roles": ["admin", "dev"]}
    assert [a.passed for a in ok.assertions] == [True]
    assert run.of_type("StepStarted")[1].payload.input == {"url": "/users/u-7"}


def test_a_jsonpath_extraction_matching_nothing_fails_the_step_extraction_failed() -> None:
    run = Run(make_flow({"name": "create", "extract": {"email": "$.body.email"}}, {"name": "next"}))
    run.start()
    run.complete(output=USER)
    failed = run.of_type("StepFailed")[0].payload
    assert failed.error.category == "VALIDATION" and failed.error.code == "extraction_failed"
    assert "$.body.email" in failed.error.message
    assert run.types[-1] == "RunFailed"


# ---------------------------------------------------------------- templated expected


def two_steps(*assertions: dict[str, Any]) -> FlowDefinition:
    return make_flow(
        {"name": "create", "extract": {"user_id": "$.body.id"}},
        {"name": "fetch", "input": {"url": "/users/{{ vars.user_id }}"}, "assertions": list(assertions)},
    )


def test_a_templated_expected_compares_with_the_extracted_value() -> None:
    run = Run(two_steps({"expression": "$.body.id", "expected": "{{ vars.user_id }}"},
                        {"expression": "body.{id: id, by: by}",
                         "expected": {"id": "{{ vars.user_id }}", "by": "{{ trigger.by }}"}},
                        {"expression": "body.note", "expected": "user {{ vars.user_id }}"}),
              make_trigger(payload={"by": "ana"}))  # fmt: skip
    run.start()
    run.complete(output=USER)
    run.complete(output={"body": {"id": "u-7", "by": "ana", "note": "user u-7"}})
    ok = run.of_type("StepSucceeded")[1].payload
    assert [(a.expected, a.passed) for a in ok.assertions] == [
        ("u-7", True), ({"id": "u-7", "by": "ana"}, True), ("user u-7", True)
    ]  # fmt: skip
    assert run.types[-1] == "RunSucceeded"


def test_a_templated_expected_that_differs_fails_showing_the_rendered_value() -> None:
    run = Run(two_steps({"expression": "body.id", "expected": "{{ vars.user_id }}"}))
    run.start()
    run.complete(output=USER)
    run.complete(output={"body": {"id": "u-8"}})
    failed = run.of_type("StepFailed")[0].payload
    assert failed.error.code == "assertion_failed"
    assert failed.error.message == "assertion failed: body.id eq 'u-7', actual 'u-8'"
    assert [(a.expected, a.actual, a.passed) for a in failed.assertions] == [("u-7", "u-8", False)]


def test_a_whole_template_expected_keeps_its_type() -> None:
    flow = make_flow(
        {"name": "count", "assertions": [{"expression": "n", "operator": "gte", "expected": "{{ trigger.min }}"}]}
    )
    run = Run(flow, make_trigger(payload={"min": 3}))
    run.start()
    run.complete(output={"n": 5})
    assert run.of_type("StepSucceeded")[0].payload.assertions[0].expected == 3


def test_an_expected_that_cannot_be_rendered_fails_the_assertion_not_the_executor() -> None:
    run = Run(make_flow({"name": "a", "assertions": [{"expression": "n", "expected": "{{ length(trigger.n) }}"}]}),
              make_trigger(payload={"n": 5}))  # fmt: skip
    run.start()
    run.complete(output={"n": 5})
    failed = run.of_type("StepFailed")[0].payload
    assert failed.error.code == "assertion_failed" and "cannot evaluate" in failed.error.message
    assert "length(trigger.n)" in failed.error.message and failed.assertions[0].passed is False
