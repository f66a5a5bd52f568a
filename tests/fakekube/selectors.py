"""Kubernetes label and field selectors (the `labelSelector` and `fieldSelector` query
parameters), parsed with the grammar of k8s.io/apimachinery and matched against objects.

Label selectors: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x,y)`, `a`, `!a`, `a>1`, `a<1`,
joined by commas. Field selectors: `path=value`, `path==value`, `path!=value`, joined by commas,
with `\\,` `\\=` `\\\\` escapes; only the paths the resource supports (others are refused, as by
the real server)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY = re.compile(rf"({_DNS_SUBDOMAIN}/)?{_NAME}")
_VALUE = re.compile(rf"({_NAME})?")
_TOKEN = re.compile(r"\s*(==|!=|=|!|\(|\)|,|<|>|[^\s=!(),<>]+)")


class SelectorError(ValueError):
    """A selector that does not parse (the server answers 400)."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str                  # "=", "!=", "in", "notin", "exists", "!exists", "gt", "lt"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        try:
            number = int(value) if present else None
        except ValueError:
            return False
        if number is None:
            return False
        return number > int(self.values[0]) if self.op == "gt" else number < int(self.values[0])


Selector = tuple[Requirement, ...]


def matches(selector: Selector, labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in selector)


# ---------------------------------------------------------------------------------------------
# Label selectors

def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        found = _TOKEN.match(text, pos)
        if not found:
            raise SelectorError(f"unable to parse requirement: unexpected input at {text[pos:]!r}")
        tokens.append(found.group(1))
        pos = found.end()
    return tokens


def _check_key(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    if not _KEY.fullmatch(key) or len(name) > 63 or len(key) - len(name) > 254:
        raise SelectorError(f"unable to parse requirement: key: Invalid value: {key!r}: "
                            "name part must consist of alphanumeric characters, '-', '_' or "
                            "'.', and must start and end with an alphanumeric character")
    return key


def _check_value(value: str) -> str:
    if len(value) > 63 or not _VALUE.fullmatch(value):
        raise SelectorError(f"unable to parse requirement: values[0][{value}]: Invalid value: "
                            f"{value!r}: a valid label must be an empty string or consist of "
                            "alphanumeric characters, '-', '_' or '.', and must start and end "
                            "with an alphanumeric character")
    return value


_OPERATORS = {"=", "==", "!=", "in", "notin", "<", ">"}


def parse_label_selector(text: str | None) -> Selector:
    """The requirements of a label selector ('' selects everything)."""
    tokens = _tokens(text or "")
    out: list[Requirement] = []
    pos = 0

    def take() -> str | None:
        nonlocal pos
        token = tokens[pos] if pos < len(tokens) else None
        pos += 1
        return token

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    while pos < len(tokens):
        token = take()
        if token == "!":
            out.append(Requirement(_check_key(take() or ""), "!exists"))
        elif token in _OPERATORS or token in ("(", ")", ","):
            raise SelectorError(f"unable to parse requirement: found {token!r}, "
                                "expected: identifier")
        else:
            key = _check_key(token)
            op = peek()
            if op is None or op == ",":
                out.append(Requirement(key, "exists"))
            elif op in ("=", "==", "!="):
                take()
                value = "" if peek() in (None, ",") else take()
                out.append(Requirement(key, "!=" if op == "!=" else "=", (_check_value(value),)))
            elif op in ("in", "notin"):
                take()
                if take() != "(":
                    raise SelectorError(f"unable to parse requirement: found {peek()!r}, "
                                        "expected: '('")
                values: list[str] = []
                expect_value = True
                while True:
                    item = take()
                    if item is None:
                        raise SelectorError("unable to parse requirement: found '', "
                                            "expected: ')'")
                    if item in (",", ")"):
                        if expect_value and (values or item == ","):
                            values.append("")  # an empty value: `a in (x,)`
                        if item == ")":
                            break
                        expect_value = True
                    elif expect_value:
                        values.append(_check_value(item))
                        expect_value = False
                    else:
                        raise SelectorError(f"unable to parse requirement: found {item!r}, "
                                            "expected: ',' or ')'")
                if not values:
                    raise SelectorError("unable to parse requirement: for 'in', 'notin' "
                                        "operators, values set can't be empty")
                out.append(Requirement(key, op, tuple(values)))
            elif op in ("<", ">"):
                take()
                value = take() or ""
                if not re.fullmatch(r"-?[0-9]+", value):
                    raise SelectorError(f"unable to parse requirement: for 'Gt', 'Lt' "
                                        f"operators, the value must be an integer: {value!r}")
                out.append(Requirement(key, "gt" if op == ">" else "lt", (value,)))
            else:
                raise SelectorError(f"unable to parse requirement: found {op!r}, expected: "
                                    "in, notin, =, ==, !=, gt, lt")
        after = take()
        if after not in (None, ","):
            raise SelectorError(f"unable to parse requirement: found {after!r}, expected: ','")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Field selectors

def _split_unescaped(text: str, separator: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current) + ("\\" if escaped else ""))
    return parts


def _unescape(value: str) -> str:
    out, chars = [], iter(value)
    for char in chars:
        if char == "\\":
            nxt = next(chars, "")
            if nxt not in ("\\", ",", "="):
                raise SelectorError(f"invalid field selector: invalid escape sequence: \\{nxt}")
            out.append(nxt)
        else:
            out.append(char)
    return "".join(out)


def parse_field_selector(text: str | None, supported: frozenset[str]) -> Selector:
    """The requirements of a field selector over the field paths in `supported`."""
    out: list[Requirement] = []
    for term in _split_unescaped(text or "", ","):
        if not term.strip():
            continue
        found = re.fullmatch(r"([^=!]*?)\s*(==|!=|=)(.*)", term, re.S)
        if not found:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
        key, op, value = found.group(1).strip(), found.group(2), found.group(3)
        if key not in supported:
            raise SelectorError(f'field label not supported: {key}')
        out.append(Requirement(key, "!=" if op == "!=" else "=", (_unescape(value),)))
    return tuple(out)


# Fields whose absence reads as "false", as the real server formats booleans.
_BOOLEAN_FIELDS = {"spec.unschedulable", "spec.hostNetwork"}


def field_value(obj: dict, path: str) -> str:
    """The value of a dotted field path, as the field selector compares it."""
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "false" if path in _BOOLEAN_FIELDS else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fields_match(selector: Selector, obj: dict) -> bool:
    return all(r.matches({r.key: field_value(obj, r.key)}) for r in selector)
