"""Calico label selectors: parse, evaluate and print them.

Used by IPPool ``nodeSelector`` and BGPPeer ``nodeSelector``. The grammar, lowest binding
first::

    selector := <empty or whitespace>            (same as all())
              | or
    or       := and ('||' and)*
    and      := unary ('&&' unary)*
    unary    := '!' unary | primary
    primary  := '(' or ')' | 'all()' | 'has(' KEY ')'
              | KEY ('==' | '!=') STRING
              | KEY ('in' | 'not in' | 'notin') '{' [STRING (',' STRING)*] '}'
              | KEY ('contains' | 'starts with' | 'startswith' | 'ends with' | 'endswith')
                STRING

KEY is a Kubernetes-style label key, ``[A-Za-z0-9_./-]+`` starting with a letter, digit or
``_``; STRING is text in single or double quotes (no escapes, as in Calico). A missing label
matches ``!=`` and ``not in`` and nothing else.

``parse_selector`` returns a frozen :class:`Selector` (cached; selectors are parsed for
every pool on every allocation); ``str(selector)`` is canonical text that parses back to an
equal selector. Every problem with the text is an :class:`InvalidResource` whose message
quotes the selector and names the position (0-based) where it went wrong.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn, Union

from ipam.errors import InvalidResource

__all__ = [
    "MAX_DEPTH",
    "All",
    "And",
    "Contains",
    "EndsWith",
    "Equals",
    "Expr",
    "Has",
    "In",
    "Not",
    "NotEquals",
    "NotIn",
    "Or",
    "Selector",
    "StartsWith",
    "parse_selector",
]

#: How deeply '(' and '!' may nest; deeper text is rejected rather than overflowing the stack.
MAX_DEPTH = 64

_KEY_START = frozenset(string.ascii_letters + string.digits + "_")
_KEY_CHARS = _KEY_START | frozenset("./-")
_MISSING = object()


# --------------------------------------------------------------------------------------------
# AST


def _check_key(key: object) -> None:
    if (
        not isinstance(key, str)
        or not key
        or key[0] not in _KEY_START
        or any(ch not in _KEY_CHARS for ch in key)
    ):
        raise InvalidResource(
            f"label key {key!r} is not valid: use letters, digits, '_', '.', '/' or '-', "
            "starting with a letter, digit or '_'."
        )


def _check_value(value: object) -> None:
    if not isinstance(value, str):
        raise InvalidResource(f"label value {value!r} is not valid: it must be a string.")
    if '"' in value and "'" in value:
        raise InvalidResource(
            f"label value {value!r} cannot be used in a selector because it contains "
            "both single and double quotes."
        )


def _quote(value: str) -> str:
    return f"'{value}'" if '"' in value else f'"{value}"'


@dataclass(frozen=True)
class All:
    """``all()``: matches every set of labels."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def __str__(self) -> str:
        return "all()"


@dataclass(frozen=True)
class Has:
    """``has(key)``."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class _KeyValue:
    key: str
    value: str

    _op = ""

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check_value(self.value)

    def __str__(self) -> str:
        return f"{self.key} {self._op} {_quote(self.value)}"


@dataclass(frozen=True)
class Equals(_KeyValue):
    """``key == 'value'``: the label is present and equal."""

    _op = "=="

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key, _MISSING) == self.value


@dataclass(frozen=True)
class NotEquals(_KeyValue):
    """``key != 'value'``: the label is missing or different."""

    _op = "!="

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key, _MISSING) != self.value


@dataclass(frozen=True)
class Contains(_KeyValue):
    """``key contains 'text'``."""

    _op = "contains"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels and self.value in labels[self.key]


@dataclass(frozen=True)
class StartsWith(_KeyValue):
    """``key starts with 'text'``."""

    _op = "starts with"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels and labels[self.key].startswith(self.value)


@dataclass(frozen=True)
class EndsWith(_KeyValue):
    """``key ends with 'text'``."""

    _op = "ends with"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels and labels[self.key].endswith(self.value)


@dataclass(frozen=True)
class _KeySet:
    key: str
    values: frozenset[str]

    _op = ""

    def __post_init__(self) -> None:
        _check_key(self.key)
        values = self.values
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise InvalidResource(
                f"the values of '{self.key} {self._op}' must be a set of strings, not {values!r}."
            )
        values = frozenset(values)
        for value in values:
            _check_value(value)
        object.__setattr__(self, "values", values)

    def __str__(self) -> str:
        inner = ", ".join(_quote(v) for v in sorted(self.values))
        return f"{self.key} {self._op} {{{inner}}}"


@dataclass(frozen=True)
class In(_KeySet):
    """``key in {'a', 'b'}``: the label is present and one of the values."""

    _op = "in"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key, _MISSING) in self.values


@dataclass(frozen=True)
class NotIn(_KeySet):
    """``key not in {'a', 'b'}``: the label is missing or none of the values."""

    _op = "not in"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key, _MISSING) not in self.values


@dataclass(frozen=True)
class Not:
    """``!expr``."""

    operand: Expr

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def __str__(self) -> str:
        if isinstance(self.operand, (All, Has, Not)):
            return f"!{self.operand}"
        return f"!({self.operand})"


@dataclass(frozen=True)
class _Junction:
    terms: tuple[Expr, ...]

    _op = ""

    def __post_init__(self) -> None:
        terms = tuple(self.terms)
        if len(terms) < 2:
            raise InvalidResource(f"'{self._op}' needs at least two operands, got {len(terms)}.")
        object.__setattr__(self, "terms", terms)

    def __str__(self) -> str:
        return f" {self._op} ".join(
            f"({t})" if isinstance(t, (Or, type(self))) else str(t) for t in self.terms
        )


@dataclass(frozen=True)
class And(_Junction):
    """``a && b && ...``."""

    _op = "&&"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(t.matches(labels) for t in self.terms)


@dataclass(frozen=True)
class Or(_Junction):
    """``a || b || ...``."""

    _op = "||"

    def matches(self, labels: Mapping[str, str]) -> bool:
        return any(t.matches(labels) for t in self.terms)


Expr = Union[All, Has, Equals, NotEquals, Contains, StartsWith, EndsWith, In, NotIn, Not, And, Or]


@dataclass(frozen=True)
class Selector:
    """A parsed selector; equal selectors have equal canonical text."""

    expr: Expr = All()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.expr.matches(labels)

    def __str__(self) -> str:
        return str(self.expr)


# --------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "string", "end", "bad" or the punctuation itself: "(", "&&", "==", ...
    text: str  # words/punctuation: as written; strings: the value; bad: the error message
    pos: int
    raw: str = ""  # strings: the value with its quotes

    def describe(self) -> str:
        if self.kind == "string":
            return f"the quoted value {self.raw}"
        return f"'{self.text}'"


_TWO_CHAR = ("&&", "||", "==", "!=")
_ONE_CHAR = "(){},!"
_OPERATOR_HINTS = {"=": " (use == or !=)", "&": " (use &&)", "|": " (use ||)"}


def _tokenize(text: str) -> list[_Token]:
    """Split text into tokens ending with an "end" token, or with a "bad" one at the first
    character that cannot start a token (the parser reports it when it gets there)."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith(_TWO_CHAR, i):
            tokens.append(_Token(text[i : i + 2], text[i : i + 2], i))
            i += 2
        elif ch in _ONE_CHAR:
            tokens.append(_Token(ch, ch, i))
            i += 1
        elif ch in "'\"":
            end = text.find(ch, i + 1)
            if end < 0:
                message = f"unterminated string starting at position {i} (no closing {ch})"
                tokens.append(_Token("bad", message, i))
                return tokens
            tokens.append(_Token("string", text[i + 1 : end], i, text[i : end + 1]))
            i = end + 1
        elif ch in _KEY_CHARS:
            start = i
            while i < n and text[i] in _KEY_CHARS:
                i += 1
            tokens.append(_Token("word", text[start:i], start))
        else:
            if ch in "=<>~&|":
                message = f"unknown operator {ch!r} at position {i}{_OPERATOR_HINTS.get(ch, '')}"
            else:
                message = f"unexpected character {ch!r} at position {i}"
            tokens.append(_Token("bad", message, i))
            return tokens
    tokens.append(_Token("end", "", n))
    return tokens


# --------------------------------------------------------------------------------------------
# Parser

_OPERATORS = "==, !=, in, not in, contains, starts with or ends with"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    # -- helpers --

    def fail(self, message: str) -> NoReturn:
        raise InvalidResource(f'selector "{self.text}" is not valid: {message}.')

    def peek(self, ahead: int = 0) -> _Token:
        token = self.tokens[min(self.index + ahead, len(self.tokens) - 1)]
        if token.kind == "bad":
            self.fail(token.text)
        return token

    def advance(self) -> _Token:
        token = self.peek()
        if token.kind != "end":
            self.index += 1
        return token

    def expected(self, what: str, token: _Token, after: str | None = None) -> NoReturn:
        where = f" after {after}" if after else ""
        self.fail(f"expected {what}{where} at position {token.pos}{self.found(token)}")

    @staticmethod
    def found(token: _Token) -> str:
        return "" if token.kind == "end" else f" but found {token.describe()}"

    def is_word(self, token: _Token, word: str) -> bool:
        return token.kind == "word" and token.text == word

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(
                f"'(' and '!' nest more than {MAX_DEPTH} levels deep at position {token.pos}"
            )

    # -- grammar --

    def parse(self) -> Expr:
        if self.peek().kind == "end":
            return All()
        expr = self.parse_or(None)
        token = self.peek()
        if token.kind == ")":
            self.fail(f"unexpected ')' at position {token.pos} with no matching '('")
        if token.kind != "end":
            self.fail(
                f"unexpected {token.describe()} at position {token.pos} after a complete "
                "expression (expected && or ||)"
            )
        return expr

    def parse_or(self, after: str | None) -> Expr:
        terms = [self.parse_and(after)]
        while self.peek().kind == "||":
            self.advance()
            terms.append(self.parse_and("'||'"))
        return terms[0] if len(terms) == 1 else Or(tuple(terms))

    def parse_and(self, after: str | None) -> Expr:
        terms = [self.parse_unary(after)]
        while self.peek().kind == "&&":
            self.advance()
            terms.append(self.parse_unary("'&&'"))
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def parse_unary(self, after: str | None) -> Expr:
        token = self.peek()
        if token.kind != "!":
            return self.parse_primary(after)
        self.advance()
        self.enter(token)
        operand = self.parse_unary("'!'")
        self.depth -= 1
        return Not(operand)

    def parse_primary(self, after: str | None) -> Expr:
        token = self.peek()
        if token.kind == "(":
            self.advance()
            self.enter(token)
            expr = self.parse_or("'('")
            self.depth -= 1
            close = self.peek()
            if close.kind != ")":
                self.fail(
                    f"expected ')' at position {close.pos} to close the '(' at position "
                    f"{token.pos}{self.found(close)}"
                )
            self.advance()
            return expr
        if token.kind != "word":
            self.expected("a label expression", token, after)
        if token.text in ("has", "all") and self.peek(1).kind == "(":
            self.advance()
            self.advance()
            return self.parse_has() if token.text == "has" else self.parse_all()
        key = self.parse_key(token)
        return self.parse_comparison(key)

    def parse_key(self, token: _Token) -> str:
        if token.text[0] not in _KEY_START:
            self.fail(
                f"label key '{token.text}' at position {token.pos} must start with a letter, "
                "digit or '_'"
            )
        self.advance()
        return token.text

    def parse_has(self) -> Expr:
        token = self.peek()
        if token.kind != "word":
            self.expected("a label key", token, "'has('")
        key = self.parse_key(token)
        close = self.peek()
        if close.kind != ")":
            self.expected("')'", close, f"'has({key}'")
        self.advance()
        return Has(key)

    def parse_all(self) -> Expr:
        close = self.peek()
        if close.kind != ")":
            self.expected("')'", close, "'all('")
        self.advance()
        return All()

    def parse_comparison(self, key: str) -> Expr:
        op = self.peek()
        if op.kind in ("==", "!="):
            self.advance()
            value = self.parse_value(f"'{op.kind}'")
            return Equals(key, value) if op.kind == "==" else NotEquals(key, value)
        if op.kind == "word":
            word = op.text
            if word == "in":
                self.advance()
                return In(key, self.parse_set("'in'"))
            if word == "notin":  # Calico's one-word spellings too
                self.advance()
                return NotIn(key, self.parse_set("'notin'"))
            if word in ("startswith", "endswith"):
                self.advance()
                value = self.parse_value(f"'{word}'")
                return StartsWith(key, value) if word == "startswith" else EndsWith(key, value)
            if word == "not":
                self.advance()
                if not self.is_word(self.peek(), "in"):
                    self.expected("'in'", self.peek(), "'not'")
                self.advance()
                return NotIn(key, self.parse_set("'not in'"))
            if word == "contains":
                self.advance()
                return Contains(key, self.parse_value("'contains'"))
            if word in ("starts", "ends"):
                self.advance()
                if not self.is_word(self.peek(), "with"):
                    self.expected("'with'", self.peek(), f"'{word}'")
                self.advance()
                value = self.parse_value(f"'{word} with'")
                return StartsWith(key, value) if word == "starts" else EndsWith(key, value)
        self.expected(f"an operator ({_OPERATORS})", op, f"label '{key}'")

    def parse_value(self, after: str) -> str:
        token = self.peek()
        if token.kind != "string":
            self.expected("a quoted value", token, after)
        self.advance()
        return token.text

    def parse_set(self, after: str) -> frozenset[str]:
        token = self.peek()
        if token.kind != "{":
            self.expected("'{' to start a set of quoted values", token, after)
        self.advance()
        values: set[str] = set()
        if self.peek().kind == "}":
            self.advance()
            return frozenset()
        values.add(self.parse_value("'{'"))
        while True:
            token = self.peek()
            if token.kind == "}":
                self.advance()
                return frozenset(values)
            if token.kind != ",":
                self.expected("',' or '}'", token, "a value in the set")
            self.advance()
            values.add(self.parse_value("','"))


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Selector:
    return Selector(_Parser(text).parse())


def parse_selector(text: str) -> Selector:
    """Parse Calico selector text; raises InvalidResource saying what is wrong and where.

    Results are cached, so calling this for every pool on every allocation is cheap.
    """
    if not isinstance(text, str):
        raise InvalidResource(f"selector must be a string, not {type(text).__name__}.")
    return _parse_cached(text)
