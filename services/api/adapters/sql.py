"""SQL pieces the API's list queries share: a WHERE clause built condition by condition, and substring search."""

from __future__ import annotations

from typing import Any


class Where:
    """Conditions and their parameters, numbered `$1, $2, …` in the order they are added."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[Any] = []

    def add(self, sql: str, value: Any) -> None:
        """`sql` names its one parameter `?`: `where.add("flow_id = ?", flow_id)`."""
        self.args.append(value)
        self.clauses.append(sql.replace("?", f"${len(self.args)}"))

    def one_or_any(self, column: str, values: list[str]) -> None:
        """`column = $n` for one value (the planner's best case), `column = ANY($n)` for several, nothing for none."""
        if len(values) == 1:
            self.add(f"{column} = ?", values[0])
        elif values:
            self.add(f"{column} = ANY(?::text[])", values)

    def any_of(self, column: str, values: list[str]) -> None:
        """`column = ANY($n)`, nothing for no values."""
        if values:
            self.add(f"{column} = ANY(?::text[])", values)

    def equal(self, column: str, value: Any) -> None:
        """`column = $n`, nothing when `value` is None."""
        if value is not None:
            self.add(f"{column} = ?", value)


def contains(text: str) -> str:
    """An ILIKE pattern matching `text` anywhere, its own `%`, `_` and `\\` taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
