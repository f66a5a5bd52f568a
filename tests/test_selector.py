"""Tests for ipam.selector: Calico label selector parsing, matching and printing."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam.errors import InvalidResource
from ipam.selector import (
    MAX_DEPTH,
    All,
    And,
    Contains,
    EndsWith,
    Equals,
    Has,
    In,
    Not,
    NotEquals,
    NotIn,
    Or,
    Selector,
    StartsWith,
    parse_selector,
)
from tests.sentences import one_sentence

NODE = {
    "rack": "r1",
    "kubernetes.io/hostname": "node-1",
    "topology.kubernetes.io/zone": "eu-west-1a",
    "empty": "",
    "quote": "it's",
}


# --------------------------------------------------------------------------------------------
# Matching, table driven

MATCH_CASES = [
    # all() and empty
    ("all()", True),
    ("", True),
    ("   \t\n ", True),
    ("!all()", False),
    # ==
    ("rack == 'r1'", True),
    ('rack == "r1"', True),
    ("rack=='r1'", True),
    ("rack == 'r2'", False),
    ("rack == ''", False),
    ("empty == ''", True),
    ("missing == 'r1'", False),
    ("missing == ''", False),
    ("kubernetes.io/hostname == 'node-1'", True),
    ("topology.kubernetes.io/zone == 'eu-west-1a'", True),
    ("quote == \"it's\"", True),
    # !=
    ("rack != 'r1'", False),
    ("rack != 'r2'", True),
    ("missing != 'r1'", True),
    ("missing != ''", True),
    ("empty != ''", False),
    # has
    ("has(rack)", True),
    ("has(empty)", True),
    ("has(missing)", False),
    ("!has(rack)", False),
    ("!has(missing)", True),
    ("has( kubernetes.io/hostname )", True),
    # in / not in
    ("rack in {'r1', 'r2'}", True),
    ("rack in {'r2','r3'}", False),
    ("rack in {}", False),
    ("rack in { }", False),
    ("rack in {\"r1\"}", True),
    ("missing in {'r1'}", False),
    ("missing in {''}", False),
    ("empty in {''}", True),
    ("rack not in {'r1', 'r2'}", False),
    ("rack not in {'r2'}", True),
    ("rack not in {}", True),
    ("missing not in {'r1'}", True),
    ("missing not in {}", True),
    # contains / starts with / ends with
    ("kubernetes.io/hostname contains 'de-'", True),
    ("kubernetes.io/hostname contains 'xx'", False),
    ("kubernetes.io/hostname contains ''", True),
    ("missing contains ''", False),
    ("missing contains 'a'", False),
    ("topology.kubernetes.io/zone starts with 'eu-'", True),
    ("topology.kubernetes.io/zone starts with 'us-'", False),
    ("missing starts with ''", False),
    ("topology.kubernetes.io/zone ends with '1a'", True),
    ("topology.kubernetes.io/zone ends with '1b'", False),
    ("missing ends with ''", False),
    # ! && || and parentheses
    ("!(rack == 'r1')", False),
    ("!rack == 'r1'", False),
    ("!!has(rack)", True),
    ("rack == 'r1' && has(empty)", True),
    ("rack == 'r1' && has(missing)", False),
    ("rack == 'r2' || has(empty)", True),
    ("rack == 'r2' || has(missing)", False),
    ("has(a)&&has(b)||has(rack)", True),
    # && binds tighter than ||: true || (false && false)
    ("has(rack) || has(missing) && has(missing)", True),
    ("(has(rack) || has(missing)) && has(missing)", False),
    # (false && x) || true
    ("has(missing) && has(rack) || has(empty)", True),
    ("has(missing) && (has(rack) || has(empty))", False),
    ("!has(missing) && !has(other)", True),
    ("!(has(missing) || has(rack))", False),
    ("((((rack == 'r1'))))", True),
    ("all() && rack == 'r1'", True),
    ("all() && rack == 'r2' || all()", True),
    # keywords are fine as label keys
    ("has == 'x'", False),
    ("in not in {}", True),
    ("all != 'x'", True),
    ("_private == 'x'", False),
    ("9lives != 'x'", True),
]


@pytest.mark.parametrize(("text", "expected"), MATCH_CASES)
def test_matches(text: str, expected: bool) -> None:
    selector = parse_selector(text)
    assert selector.matches(NODE) is expected
    # Its canonical text means the same.
    again = parse_selector(str(selector))
    assert again == selector
    assert again.matches(NODE) is expected


def test_labels_without_any_label() -> None:
    assert parse_selector("all()").matches({})
    assert parse_selector("a != 'x'").matches({})
    assert parse_selector("a not in {'x'}").matches({})
    assert not parse_selector("a == 'x'").matches({})
    assert not parse_selector("has(a)").matches({})


def test_empty_selector_is_all() -> None:
    assert parse_selector("") == parse_selector("all()") == Selector(All()) == Selector()
    assert str(parse_selector("  ")) == "all()"


@pytest.mark.parametrize(
    ("text", "expr"),
    [
        ("a == 'x'", Equals("a", "x")),
        ("a != \"x\"", NotEquals("a", "x")),
        ("has(a)", Has("a")),
        ("!has(a)", Not(Has("a"))),
        ("a in {'y', 'x', 'y'}", In("a", frozenset({"x", "y"}))),
        ("a not in {}", NotIn("a", frozenset())),
        ("a contains 'x'", Contains("a", "x")),
        ("a starts with 'x'", StartsWith("a", "x")),
        ("a ends with 'x'", EndsWith("a", "x")),
        # Calico's one-word spellings
        ("a startswith 'x'", StartsWith("a", "x")),
        ("a endswith'x'", EndsWith("a", "x")),
        ("a notin {'x'}", NotIn("a", frozenset({"x"}))),
        ("a notin{}", NotIn("a", frozenset())),
        ("startswith startswith 'x'", StartsWith("startswith", "x")),
        ("notin == 'x'", Equals("notin", "x")),
        ("has(a) && has(b) && has(c)", And((Has("a"), Has("b"), Has("c")))),
        ("has(a) || has(b) && has(c)", Or((Has("a"), And((Has("b"), Has("c")))))),
        ("(has(a) || has(b)) && has(c)", And((Or((Has("a"), Has("b"))), Has("c")))),
        ("has(a) && (has(b) && has(c))", And((Has("a"), And((Has("b"), Has("c")))))),
        ("!(has(a) && has(b))", Not(And((Has("a"), Has("b"))))),
        ("!has(a) && has(b)", And((Not(Has("a")), Has("b")))),
    ],
)
def test_parse_tree(text: str, expr: object) -> None:
    assert parse_selector(text) == Selector(expr)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", "all()"),
        ("rack=='a'", 'rack == "a"'),
        ("rack == 'say \"hi\"'", "rack == 'say \"hi\"'"),
        ("r in {'b','a'}", 'r in {"a", "b"}'),
        ("r not in {}", "r not in {}"),
        ("!(a=='b')", '!(a == "b")'),
        ("!!has(a)", "!!has(a)"),
        ("has(a)||has(b)&&has(c)", "has(a) || has(b) && has(c)"),
        ("(has(a)||has(b))&&has(c)", "(has(a) || has(b)) && has(c)"),
        ("has(a)&&(has(b)&&has(c))", "has(a) && (has(b) && has(c))"),
        ("(has(a)&&has(b))&&has(c)", "(has(a) && has(b)) && has(c)"),
        ("(has(a))", "has(a)"),
        ("a starts  with 'x'", 'a starts with "x"'),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    assert str(parse_selector(text)) == canonical
    assert parse_selector(canonical) == parse_selector(text)


def test_selectors_are_hashable_and_cached() -> None:
    a = parse_selector("rack == 'r1' && has(x)")
    assert a is parse_selector("rack == 'r1' && has(x)")
    assert hash(a) == hash(parse_selector('rack == "r1" && has(x)'))
    assert len({a, parse_selector('rack == "r1" && has(x)')}) == 1


def test_ast_rejects_what_text_cannot_express() -> None:
    with pytest.raises(InvalidResource):
        Equals("-bad", "x")
    with pytest.raises(InvalidResource):
        Has("a b")
    with pytest.raises(InvalidResource):
        Equals("a", "both ' and \"")
    with pytest.raises(InvalidResource):
        In("a", "xy")
    with pytest.raises(InvalidResource):
        And((Has("a"),))
    with pytest.raises(InvalidResource):
        parse_selector(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Errors

ERROR_CASES = [
    # (text, position named in the message, a fragment of the message)
    ("rack == ", 8, "expected a quoted value after '=='"),
    ("rack == r1", 8, "expected a quoted value after '=='"),
    ("rack != ", 8, "expected a quoted value after '!='"),
    ("rack = 'a'", 5, "unknown operator '=' at position 5 (use == or !=)"),
    ("rack < 'a'", 5, "unknown operator '<'"),
    ("rack", 4, "expected an operator"),
    ("rack is 'a'", 5, "expected an operator"),
    ("rack 'a'", 5, "expected an operator"),
    ("rack contains", 13, "expected a quoted value after 'contains'"),
    ("rack starts 'a'", 12, "expected 'with' after 'starts'"),
    ("rack ends", 9, "expected 'with' after 'ends'"),
    ("rack starts with", 16, "expected a quoted value after 'starts with'"),
    ("rack not 'a'", 9, "expected 'in' after 'not'"),
    ("rack in 'a'", 8, "expected '{'"),
    ("rack in {'a' 'b'}", 13, "expected ',' or '}'"),
    ("rack in {'a',}", 13, "expected a quoted value after ','"),
    ("rack in {'a'", 12, "expected ',' or '}'"),
    ("rack in {a}", 9, "expected a quoted value"),
    ("rack not in {", 13, "expected a quoted value after '{'"),
    # unterminated strings
    ("rack == 'r1", 8, "unterminated string"),
    ('rack == "r1', 8, "unterminated string"),
    ("rack == 'r1\"", 8, "unterminated string"),
    ("rack in {'a', 'b}", 14, "unterminated string"),
    # unbalanced parentheses
    ("(rack == 'a'", 12, "expected ')' at position 12 to close the '(' at position 0"),
    ("((has(a)) || has(b)", 19, "to close the '(' at position 0"),
    ("rack == 'a')", 11, "unexpected ')' at position 11 with no matching '('"),
    ("has(a))", 6, "unexpected ')'"),
    (")", 0, "expected a label expression"),
    ("(", 1, "expected a label expression after '('"),
    ("()", 1, "expected a label expression after '('"),
    # trailing garbage
    ("rack == 'a' zone == 'b'", 12, "unexpected 'zone' at position 12 after a complete expression"),
    ("has(a) 'x'", 7, "after a complete expression"),
    ("has(a) !", 7, "after a complete expression"),
    ("has(a) {", 7, "after a complete expression"),
    ("all() all()", 6, "after a complete expression"),
    # empty operands of && / ||
    ("rack == 'a' &&", 14, "expected a label expression after '&&'"),
    ("rack == 'a' ||", 14, "expected a label expression after '||'"),
    ("&& rack == 'a'", 0, "expected a label expression at position 0 but found '&&'"),
    ("|| rack == 'a'", 0, "expected a label expression"),
    ("has(a) && && has(b)", 10, "expected a label expression after '&&'"),
    ("has(a) || || has(b)", 10, "expected a label expression after '||'"),
    ("has(a) && || has(b)", 10, "expected a label expression after '&&'"),
    ("(has(a) &&) || has(b)", 10, "expected a label expression after '&&'"),
    ("!", 1, "expected a label expression after '!'"),
    ("has(a) && !", 11, "expected a label expression after '!'"),
    # single & and |
    ("has(a) & has(b)", 7, "unknown operator '&' at position 7 (use &&)"),
    ("has(a) | has(b)", 7, "unknown operator '|' at position 7 (use ||)"),
    # has() / all()
    ("has(", 4, "expected a label key after 'has('"),
    ("has()", 4, "expected a label key after 'has('"),
    ("has('a')", 4, "expected a label key after 'has('"),
    ("has(a", 5, "expected ')' after 'has(a'"),
    ("has(a b)", 6, "expected ')' after 'has(a'"),
    ("all(", 4, "expected ')' after 'all('"),
    ("all(x)", 4, "expected ')' after 'all('"),
    # bad keys and characters
    ("-rack == 'a'", 0, "label key '-rack' at position 0 must start with a letter, digit or '_'"),
    ("has(/a)", 4, "label key '/a'"),
    ("rack@x == 'a'", 4, "unexpected character '@' at position 4"),
    ("rack == 'a' # comment", 12, "unexpected character '#'"),
    ("zone == 'é' && ñ == 'x'", 15, "unexpected character 'ñ'"),
    # too deep
    ("(" * (MAX_DEPTH + 5) + "has(a)" + ")" * (MAX_DEPTH + 5), MAX_DEPTH, "nest more than"),
    ("!" * (MAX_DEPTH + 5) + "has(a)", MAX_DEPTH, "nest more than"),
]


@pytest.mark.parametrize(("text", "position", "fragment"), ERROR_CASES)
def test_errors(text: str, position: int, fragment: str) -> None:
    with pytest.raises(InvalidResource) as info:
        parse_selector(text)
    one_sentence(info.value, fragment, f"at position {position}",
                 prefix=f'selector "{text}" is not valid: ')


def test_error_examples_from_the_brief() -> None:
    with pytest.raises(InvalidResource) as info:
        parse_selector("rack == ")
    assert str(info.value) == (
        "selector \"rack == \" is not valid: expected a quoted value after '==' at position 8."
    )
    with pytest.raises(InvalidResource) as info:
        parse_selector("rack = 'a'")
    assert str(info.value) == (
        "selector \"rack = 'a'\" is not valid: unknown operator '=' at position 5 "
        "(use == or !=)."
    )


def test_first_error_wins() -> None:
    # A syntax error before a lexical one is reported first.
    with pytest.raises(InvalidResource, match="at position 0"):
        parse_selector("&& 'unterminated")


def test_nesting_up_to_the_limit_is_fine() -> None:
    depth = MAX_DEPTH
    text = "(" * depth + "has(a)" + ")" * depth
    assert parse_selector(text) == Selector(Has("a"))
    assert parse_selector("!" * depth + "has(a)").matches({}) is (depth % 2 == 1)


def test_long_flat_chains() -> None:
    text = " && ".join(f"has(k{i})" for i in range(2000))
    selector = parse_selector(text)
    assert selector.matches({f"k{i}": "" for i in range(2000)})
    assert not selector.matches({})
    assert parse_selector(str(selector)) == selector


# --------------------------------------------------------------------------------------------
# Properties

KEYWORDS = ["has", "all", "in", "not", "contains", "starts", "ends", "with"]
SMALL_KEYS = ["a", "b", "rack", "kubernetes.io/hostname"]
SMALL_VALUES = ["", "x", "y", "xy", "it's", 'say "hi"']

keys = st.one_of(
    st.sampled_from(SMALL_KEYS + KEYWORDS),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,20}", fullmatch=True),
)
values = st.one_of(
    st.sampled_from(SMALL_VALUES),
    st.text(max_size=12).filter(lambda v: not ('"' in v and "'" in v)),
)

leaves = st.one_of(
    st.just(All()),
    st.builds(Has, keys),
    st.builds(Equals, keys, values),
    st.builds(NotEquals, keys, values),
    st.builds(Contains, keys, values),
    st.builds(StartsWith, keys, values),
    st.builds(EndsWith, keys, values),
    st.builds(In, keys, st.frozensets(values, max_size=4)),
    st.builds(NotIn, keys, st.frozensets(values, max_size=4)),
)


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    terms = st.lists(children, min_size=2, max_size=4).map(tuple)
    return st.one_of(st.builds(Not, children), st.builds(And, terms), st.builds(Or, terms))


exprs = st.recursive(leaves, _extend, max_leaves=12)
selectors = st.builds(Selector, exprs)
labels = st.dictionaries(
    st.sampled_from(SMALL_KEYS + KEYWORDS), st.sampled_from(SMALL_VALUES), max_size=6
)


def reference(expr: object, lbls: dict[str, str]) -> bool:
    """An independent evaluator, written from Calico's documentation."""
    match expr:
        case All():
            return True
        case Has(key=k):
            return k in lbls
        case Equals(key=k, value=v):
            return k in lbls and lbls[k] == v
        case NotEquals(key=k, value=v):
            return not (k in lbls and lbls[k] == v)
        case Contains(key=k, value=v):
            return k in lbls and lbls[k].find(v) >= 0
        case StartsWith(key=k, value=v):
            return k in lbls and lbls[k][: len(v)] == v
        case EndsWith(key=k, value=v):
            return k in lbls and (v == "" or lbls[k][-len(v) :] == v)
        case In(key=k, values=vs):
            return k in lbls and any(lbls[k] == v for v in vs)
        case NotIn(key=k, values=vs):
            return not (k in lbls and any(lbls[k] == v for v in vs))
        case Not(operand=e):
            return not reference(e, lbls)
        case And(terms=ts):
            return all(reference(t, lbls) for t in ts)
        case Or(terms=ts):
            return any(reference(t, lbls) for t in ts)
    raise AssertionError(expr)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(selectors, labels)
def test_round_trip_and_matching(selector: Selector, lbls: dict[str, str]) -> None:
    text = str(selector)
    parsed = parse_selector(text)
    assert parsed == selector
    assert str(parsed) == text
    expected = reference(selector.expr, lbls)
    assert selector.matches(lbls) is expected
    assert parsed.matches(lbls) is expected


SELECTOR_ALPHABET = list("()!&|={},'\" \tabrk-./_") + [
    "has(", "all()", " in ", " not ", "&&", "||", "==", "!=", " contains ", " starts with ",
    " ends with ", "{}", "'x'", '"y"', "rack",
]
junk = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(SELECTOR_ALPHABET), max_size=25).map("".join),
)


def _check_outcome(text: str) -> None:
    try:
        selector = parse_selector(text)
    except InvalidResource as error:
        message = str(error)
        assert message.startswith(f'selector "{text}" is not valid: ')
        assert re.search(r"at position \d+", message)
        assert message.endswith(".")
    else:
        assert isinstance(selector, Selector)
        assert parse_selector(str(selector)) == selector


@settings(max_examples=600)
@given(junk)
def test_junk_only_raises_invalid_resource(text: str) -> None:
    _check_outcome(text)


@settings(max_examples=300)
@given(selectors, st.data())
def test_mutated_selectors_only_raise_invalid_resource(selector: Selector, data) -> None:
    text = str(selector)
    cut = data.draw(st.integers(0, len(text)))
    length = data.draw(st.integers(0, 3))
    insert = data.draw(st.sampled_from(["", *SELECTOR_ALPHABET]))
    _check_outcome(text[:cut] + insert + text[cut + length :])
