"""How one line of a rule file reads: `targets = function(args, keyword=arg)`.

Lines are Python expression syntax, parsed with `ast` and never executed. An argument is a
value name (`x`), an attribute of the node computing a value (`y.epsilon`), or a plain
literal (a number, string, None, or a flat list of numbers or strings).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Attribute:
    value: str
    attribute: str


@dataclass(frozen=True)
class Literal:
    value: object


@dataclass(frozen=True)
class Call:
    """`targets = function(args, keyword=arg)`: one line of a rule."""
    targets: tuple
    function: str
    args: tuple
    keywords: dict
    text: str


def parse_lines(text) -> list:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise RuleError("an empty pattern or result")
    return [parse_call(line) for line in lines]


def parse_call(text) -> Call:
    text = text.strip()
    try:
        tree = ast.parse(text, mode="exec").body
    except SyntaxError as error:
        raise RuleError(f"cannot parse '{text}': {error.msg}") from None
    except (MemoryError, RecursionError):  # what the parser raises on very deep nesting
        raise RuleError(f"cannot parse '{text[:80]}': nested too deeply") from None
    if len(tree) != 1:
        raise RuleError(f"'{text}' is not one statement")
    statement = tree[0]
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        targets, call = _targets(statement.targets[0], text), statement.value
    elif isinstance(statement, ast.Expr):
        targets, call = (), statement.value
    else:
        raise RuleError(f"'{text}' is neither 'names = f(args)' nor 'f(args)'")
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise RuleError(f"'{text}' does not call a named function or op")
    if any(kw.arg is None for kw in call.keywords):
        raise RuleError(f"'{text}' passes '**': keywords must be written out")
    args = tuple(_argument(arg, text) for arg in call.args)
    keywords = {kw.arg: _argument(kw.value, text) for kw in call.keywords}
    return Call(targets, call.func.id, args, keywords, text)


def _targets(node, text) -> tuple:
    elements = node.elts if isinstance(node, ast.Tuple) else [node]
    if not all(isinstance(element, ast.Name) for element in elements):
        raise RuleError(f"'{text}' assigns to something other than names")
    return tuple(element.id for element in elements)


def _argument(node, text):
    if isinstance(node, ast.Name):
        return Name(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return Attribute(node.value.id, node.attr)
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = _NOT_A_LITERAL
    if not _plain_literal(value):
        # get_source_segment, unlike unparse, does not recurse on a deeply nested argument.
        raise RuleError(f"'{ast.get_source_segment(text, node)}' in '{text}' is not a name, attribute or literal "
                        "(a number, string, None, or a list of numbers or strings)")
    return Literal(value)


_NOT_A_LITERAL = object()
_INT64 = range(-2**63, 2**63)


def _plain_literal(value, nested=False) -> bool:
    """What an ONNX attribute or a predicate can take: a number, string, None or a flat list."""
    if isinstance(value, bool) or value is None:
        return not nested
    if isinstance(value, int):
        return value in _INT64
    if isinstance(value, (float, str)):
        return True
    if isinstance(value, (list, tuple)) and not nested:
        return all(_plain_literal(element, nested=True) for element in value)
    return False
