"""Service settings come only from `FLOWTRAIL_<SERVICE>_<NAME>`: a bare `PORT` or `HOST` in the environment (set by
many shells, PaaS platforms and container images) must not move a service to another port or interface."""

from __future__ import annotations

import pytest
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.executor.settings import ExecutorSettings
from services.ingest.settings import IngestSettings
from services.projector.settings import ProjectorSettings

SERVICES: list[tuple[str, type[BaseSettings]]] = [
    ("API", ApiSettings),
    ("EXECUTOR", ExecutorSettings),
    ("INGEST", IngestSettings),
    ("PROJECTOR", ProjectorSettings),
]
PORT_FIELD = {"API": "port", "EXECUTOR": "web_port", "INGEST": "port", "PROJECTOR": "http_port"}


def _own_fields(cls: type[BaseSettings]) -> list[str]:
    """The fields a service reads from FLOWTRAIL_<SERVICE>_<NAME> (the common ones are FLOWTRAIL_<NAME>)."""
    return [name for name, f in cls.model_fields.items() if f.validation_alias is not None]


@pytest.mark.parametrize(("service", "cls"), SERVICES, ids=[s for s, _ in SERVICES])
def test_a_bare_variable_named_like_a_setting_changes_nothing(
    service: str, cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = _own_fields(cls)
    assert fields, f"{service} has no settings of its own"
    defaults = cls()
    for name in fields:
        for variant in (name.upper(), name):
            monkeypatch.setenv(variant, "not-a-setting-for-flowtrail")
    # Every bare name is set to garbage: were any read, validation would fail or a value would change.
    assert cls().model_dump() == defaults.model_dump()


@pytest.mark.parametrize(("service", "cls"), SERVICES, ids=[s for s, _ in SERVICES])
def test_the_service_prefixed_variable_and_the_field_name_both_set_a_setting(
    service: str, cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = PORT_FIELD[service]
    monkeypatch.setenv(f"FLOWTRAIL_{service}_{name.upper()}", "18123")
    assert getattr(cls(), name) == 18123
    assert getattr(cls(**{name: 18124}), name) == 18124  # tests and the launcher build settings by field name
