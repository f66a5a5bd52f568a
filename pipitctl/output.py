"""Rendering for the terminal: aligned tables, usage bars, YAML and JSON documents."""

from __future__ import annotations

import json
from collections.abc import Sequence

import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned on the widest cell, kubectl/calicoctl style (no borders)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def bar(fraction: float, width: int = 20) -> str:
    """[#####---------------] for a fraction in 0..1 (any use shows at least one mark)."""
    marks = round(max(0.0, min(1.0, fraction)) * width)
    if fraction > 0 and marks == 0:
        marks = 1
    return "[" + "#" * marks + "-" * (width - marks) + "]"


def percent(value: float) -> str:
    """' 25.0%', and '<0.1%' rather than ' 0.0%' when something is in use."""
    return f"{'<0.1':>5}%" if 0 < value < 0.05 else f"{value:5.1f}%"


def yes_no(value: bool) -> str:
    return "true" if value else "false"


def empty_list() -> dict:
    return {"apiVersion": "pipit.dev/v1", "kind": "List", "items": []}


def documents_yaml(documents: Sequence[dict]) -> str:
    """A YAML stream that `pipitctl apply -f` reads back (none: an empty List, which applies
    as nothing rather than as an empty file)."""
    return yaml.safe_dump_all(documents or [empty_list()], sort_keys=False,
                              default_flow_style=False).rstrip()


def pick_columns(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 wanted: Sequence[str]) -> tuple[list[str], list[list[object]]]:
    """custom-columns=A,B (calicoctl's): the named columns of a table, in that order."""
    index = {h.lower(): i for i, h in enumerate(headers)}
    unknown = [w for w in wanted if w.strip().lower() not in index]
    if unknown or not wanted:
        raise ValueError(f"column {unknown[0]!r} is not one of {', '.join(headers)}"
                         if unknown else f"name at least one of {', '.join(headers)}")
    picked = [index[w.strip().lower()] for w in wanted]
    return [headers[i] for i in picked], [[row[i] for i in picked] for row in rows]


def documents_json(documents: Sequence[dict], single: bool) -> str:
    if single:
        return json.dumps(documents[0], indent=2)
    return json.dumps({"apiVersion": "pipit.dev/v1", "kind": "List", "items": list(documents)},
                      indent=2)
