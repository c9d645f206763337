"""`python`: user functions registered under the `flowtrail.actions` entry-point group, called with the step's input."""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from schemas.events import ErrorCategory
from schemas.flows import PythonInput
from services.executor.adapters.actions_base import StepCall, StepError, cap_output, json_safe, parse_input

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "flowtrail.actions"


class ActionError(Exception):
    """Raise from an action to classify its failure: TRANSIENT and CONFLICT are retried, the others are not."""

    def __init__(self, message: str, *, category: ErrorCategory | str = ErrorCategory.INTERNAL,
                 code: str | None = None, details: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message = message
        try:
            self.category = ErrorCategory(str(category).upper())
        except ValueError:
            self.category = ErrorCategory.INTERNAL
        self.code = code
        self.details = details or {}


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action may want besides its input: which run and attempt this is, and its idempotency key."""

    run_id: str
    step: str
    attempt: int
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class _Loaded:
    function: Callable[..., Any]
    wants_context: bool


class PythonActions:
    """Finds and calls the functions distributions register under `flowtrail.actions`.

    A distribution plugs a function in by declaring, in its pyproject.toml::

        [project.entry-points."flowtrail.actions"]
        score_lead = "acme_flows.leads:score"

    and a step calls it with ``{"action": "python", "input": {"function": "score_lead", "input": {…}}}``. The
    function gets the rendered ``input`` (and, when it has a ``context`` parameter, an `ActionContext` with the
    attempt's idempotency key); it may be sync (run in a worker thread) or async; its return value, as JSON, is
    the step's output. Raising `ActionError` chooses the error category; any other exception is INTERNAL.
    """

    def __init__(self, *, max_output_bytes: int, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self.max_bytes = max_output_bytes
        self._entry_points: dict[str, EntryPoint] | None = None
        self._loaded: dict[str, _Loaded] = {}

    def registered(self, *, refresh: bool = False) -> dict[str, EntryPoint]:
        """Entry points of the group by name; the first distribution found wins a name two declare."""
        if self._entry_points is None or refresh:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group):
                if ep.name in found and found[ep.name].value != ep.value:
                    log.warning("%s %r is declared twice (%s, %s); using the first", self.group, ep.name,
                                found[ep.name].value, ep.value)  # fmt: skip
                found.setdefault(ep.name, ep)
            self._entry_points = found
        return self._entry_points

    def _function(self, name: str) -> _Loaded:
        if (loaded := self._loaded.get(name)) is not None:
            return loaded
        ep = self.registered().get(name) or self.registered(refresh=True).get(name)
        if ep is None:
            known = ", ".join(sorted(self.registered())) or "none"
            raise StepError(ErrorCategory.VALIDATION, f"python function {name!r} is not registered under entry-point "
                            f"group {self.group!r}; registered: {known}", code="unknown_function")  # fmt: skip
        try:
            function = ep.load()
        except Exception as exc:
            raise StepError(ErrorCategory.INTERNAL, f"python function {name!r} ({ep.value}) failed to load: "
                            f"{type(exc).__name__}: {exc}", code="function_load_failed") from exc  # fmt: skip
        if not callable(function):
            raise StepError(ErrorCategory.INTERNAL, f"python function {name!r} ({ep.value}) is not callable",
                            code="function_load_failed")  # fmt: skip
        loaded = self._loaded[name] = _Loaded(function, _wants_context(function))
        return loaded

    async def call(self, call: StepCall) -> Any:
        spec = parse_input(PythonInput, call.input, "python")
        loaded = self._function(spec.function)
        kwargs: dict[str, Any] = {}
        if loaded.wants_context:
            kwargs["context"] = ActionContext(call.run_id, call.step, call.attempt, call.idempotency_key)
        try:
            if inspect.iscoroutinefunction(loaded.function):
                result = await loaded.function(spec.input, **kwargs)
            else:
                # A worker thread: a slow sync function must not stall the executor's other runs and heartbeats.
                result = await asyncio.to_thread(loaded.function, spec.input, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
        except ActionError as exc:
            raise StepError(exc.category, exc.message, code=exc.code or "action_error", details=exc.details) from exc
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc))[-4000:]
            message = f"python function {spec.function!r} raised {type(exc).__name__}: {exc}"
            raise StepError(ErrorCategory.INTERNAL, message, code="function_raised", details={"trace": trace}) from exc
        try:
            output = json_safe(result)
        except TypeError as exc:
            raise StepError(ErrorCategory.INTERNAL, f"python function {spec.function!r} returned a value that is "
                            f"not JSON: {exc}", code="output_not_json") from exc  # fmt: skip
        return cap_output(output, self.max_bytes)


def _wants_context(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "context" or p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
