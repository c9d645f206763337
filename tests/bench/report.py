"""The one benchmark table: raw ceilings, figures as ratios of them, targets; rendered as text and JSON."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

# Rows are printed group by group in this order; a new benchmark module picks one or adds its own.
GROUPS = (
    "ceiling",
    "throughput",
    "latency",
    "projection",
    "rebuild",
    "query",
    "batch",
    "memory",
    "stage",
    "cpu",
    "compression",
)


@dataclass(frozen=True)
class Target:
    """What the product wants, e.g. `Target(">=", 0.3, on="ratio")` or `Target("<=", 20, unit="ms")`."""

    op: Literal[">=", "<="]
    bound: float
    on: Literal["value", "ratio"] = "value"
    unit: str = ""

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x >= self.bound if self.op == ">=" else x <= self.bound

    def text(self) -> str:
        bound = f"{_num(self.bound)}x" if self.on == "ratio" else f"{_num(self.bound)} {self.unit}".rstrip()
        return f"{'≥' if self.op == '>=' else '≤'} {bound}"


@dataclass(frozen=True)
class Ceiling:
    """A raw rate or latency of Kafka or PostgreSQL alone, measured in this run."""

    key: str
    label: str
    value: float
    unit: str


@dataclass
class Figure:
    group: str
    name: str
    value: float
    unit: str
    ceiling: str | None = None  # key of the Ceiling this figure is divided by
    target: Target | None = None
    note: str = ""


@dataclass
class Report:
    scale: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    ceilings: dict[str, Ceiling] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    # Anything that explains a figure (stage timelines, CPU per process, settings): JSON only.
    details: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def add_ceiling(self, key: str, label: str, value: float, unit: str, *, target: Target | None = None) -> Ceiling:
        ceiling = Ceiling(key, label, value, unit)
        self.ceilings[key] = ceiling
        self.figures.append(Figure("ceiling", label, value, unit, target=target))
        return ceiling

    def add(self, group: str, name: str, value: float, unit: str, *, ceiling: str | None = None,
            target: Target | None = None, note: str = "") -> Figure:  # fmt: skip
        assert group in GROUPS, f"unknown group {group!r}; add it to GROUPS"
        figure = Figure(group, name, value, unit, ceiling, target, note)
        self.figures.append(figure)
        return figure

    def ratio(self, figure: Figure) -> float | None:
        ceiling = self.ceilings.get(figure.ceiling) if figure.ceiling else None
        if ceiling is None or not ceiling.value:
            return None
        return figure.value / ceiling.value

    def rows(self) -> list[dict[str, Any]]:
        ordered = sorted(self.figures, key=lambda f: GROUPS.index(f.group))
        out = []
        for f in ordered:
            ratio = self.ratio(f)
            ceiling = self.ceilings.get(f.ceiling) if f.ceiling else None
            out.append({
                "group": f.group, "figure": f.name, "value": f.value, "unit": f.unit,
                "ceiling": asdict(ceiling) if ceiling else None, "ratio": ratio,
                "target": f.target.text() if f.target else None,
                "met": f.target.met(f.value, ratio) if f.target else None, "note": f.note,
            })  # fmt: skip
        return out

    def render(self) -> str:
        header = ("figure", "value", "unit", "raw ceiling", "ratio", "target")
        table: list[tuple[str, ...]] = []
        for r in self.rows():
            c = r["ceiling"]
            mark = {True: " ✓", False: " ✗", None: ""}[r["met"]] if r["target"] else ""
            table.append((
                r["figure"] + (f" ({r['note']})" if r["note"] else ""),
                _num(r["value"]),
                r["unit"],
                f"{_num(c['value'])} {c['unit']} {c['label'].removeprefix('raw ')}" if c else "",
                f"{r['ratio']:.3f}" if r["ratio"] is not None else "",
                (r["target"] or "") + mark,
            ))  # fmt: skip
        widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
        right = {1, 4}

        def line(cells: tuple[str, ...]) -> str:
            return " | ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        rule = "-+-".join("-" * w for w in widths)
        m = self.machine
        title = (
            f"Flowtrail bench — scale {self.scale.get('name', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('memory_total_mb', '?')} MB, load {m.get('loadavg_start', '?')} at start, "
            f"Kafka {m.get('kafka_version', '?')}, PostgreSQL {m.get('postgres_version', '?')}"
        )
        return "\n".join([title, line(header), rule, *(line(row) for row in table)])

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started_at, 1),
            "scale": self.scale,
            "machine": self.machine,
            "ceilings": {k: asdict(c) for k, c in self.ceilings.items()},
            "figures": self.rows(),
            "details": self.details,
        }

    def write(self, directory: Path) -> Path:
        """`latest.json`, plus a dated copy so earlier runs stay comparable."""
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2, default=str)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (directory / f"{stamp}-{self.scale.get('name', 'x')}.json").write_text(text)
        latest = directory / "latest.json"
        latest.write_text(text)
        return latest


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"
