"""What: loading and validating the declarative rule files in `rules/`.

A rule file is TOML. Its `pattern`, `when`, `compute` and `result` are written as short
statements in Python's expression syntax, parsed with `ast` and never executed:

    pattern = '''
    conv = Conv(x, W, B)
    y = BatchNormalization(conv, gamma, beta, mean, var)
    '''
    when = ["constant(W, B, gamma, beta, mean, var)", "bn_inference(y)"]
    compute = ["W2, B2 = fold_bn_into_conv(W, B, gamma, beta, mean, var, y.epsilon)"]
    result = "y = Conv(x, W2, B2, like=conv)"

Names are values: `conv` is the output of the pattern's Conv node, `x` a free value.
`y.epsilon` is an attribute of the node that produces `y`, ONNX defaults filled in.
In `result`, `like=conv` copies that node's attributes; other keywords set attributes.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import OnnxfoldError
from .predicates import PREDICATES
from .transforms import TRANSFORMS

COMMUTATIVE = {"Add", "Mul"}


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


@dataclass
class Rule:
    name: str
    summary: str
    description: str
    pattern: list  # Calls whose function is an ONNX op type
    when: list  # Calls of predicates
    compute: list  # Calls of transforms
    result: list  # Calls whose function is an ONNX op type
    examples: list = field(default_factory=list)
    counterexamples: list = field(default_factory=list)
    source: str = ""

    @property
    def root(self) -> Call:
        return self.pattern[-1]

    @cached_property
    def compute_arguments(self) -> frozenset:
        """Names of the pattern values the compute lines read."""
        return frozenset(arg.name for line in self.compute for arg in line.args if isinstance(arg, Name))

    @property
    def producers(self) -> dict:
        """Pattern value name -> the pattern line that computes it."""
        return {target: line for line in self.pattern for target in line.targets}


def builtin_rules_dir() -> Path:
    """The shipped rules: installed as package data, or the source tree's `rules/`."""
    try:
        import onnxfold_rules
    except ImportError:
        return Path(__file__).resolve().parent.parent / "rules"
    return Path(onnxfold_rules.__file__).parent


def load_rules(extra_dirs=()) -> list:
    """Every rule: the shipped ones, then the user's, in file-name order."""
    rules, seen = [], {}
    for folder in [builtin_rules_dir(), *map(Path, extra_dirs)]:
        if not folder.is_dir():
            raise OnnxfoldError("the rules folder does not exist", folder)
        for path in sorted(folder.glob("*.toml")):
            rule = load_rule_file(path)
            if rule.name in seen:
                raise OnnxfoldError(f"rule '{rule.name}' is already defined in {seen[rule.name]}", path)
            seen[rule.name] = path
            rules.append(rule)
    return rules


def load_rule_file(path) -> Rule:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise OnnxfoldError(f"not a readable rule file ({error})", path) from None
    try:
        rule = _build_rule(data, path)
        _validate(rule)
    except RuleError as error:
        raise OnnxfoldError(f"rule '{data.get('name', path.stem)}': {error}", path) from None
    return rule


class RuleError(ValueError):
    pass


def _build_rule(data, path) -> Rule:
    for key in ("summary", "pattern", "result"):
        if not isinstance(data.get(key), str):
            raise RuleError(f"'{key}' is missing or not a string")
    return Rule(
        name=data.get("name", path.stem),
        summary=data["summary"],
        description=data.get("description", "").strip(),
        pattern=_parse_lines(data["pattern"]),
        when=[_parse_call(text) for text in data.get("when", [])],
        compute=[_parse_call(text) for text in data.get("compute", [])],
        result=_parse_lines(data["result"]),
        examples=data.get("examples", []),
        counterexamples=data.get("counterexamples", []),
        source=str(path),
    )


def _parse_lines(text) -> list:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise RuleError("an empty pattern or result")
    return [_parse_call(line) for line in lines]


def _parse_call(text) -> Call:
    try:
        tree = ast.parse(text.strip(), mode="exec").body
    except SyntaxError as error:
        raise RuleError(f"cannot parse '{text}': {error.msg}") from None
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
    args = tuple(_argument(arg, text) for arg in call.args)
    keywords = {kw.arg: _argument(kw.value, text) for kw in call.keywords}
    return Call(targets, call.func.id, args, keywords, text.strip())


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
        return Literal(ast.literal_eval(node))
    except ValueError:
        raise RuleError(f"'{ast.unparse(node)}' in '{text}' is not a name, attribute or literal") from None


# --- validation ------------------------------------------------------------------------

def _validate(rule: Rule) -> None:
    producers = rule.producers
    pattern_values = set(producers)
    free_values = {arg.name for line in rule.pattern for arg in line.args
                   if isinstance(arg, Name) and arg.name not in pattern_values}
    _check_pattern(rule, producers)
    bound = pattern_values | free_values
    for line in rule.when:
        _check_call(line, PREDICATES, "predicate", bound, pattern_values)
    for line in rule.compute:
        _check_call(line, TRANSFORMS, "transform", bound, pattern_values)
        bound = bound | set(line.targets)
    _check_result(rule, bound - pattern_values | {rule.root.targets[0]}, pattern_values)


def _check_pattern(rule, producers) -> None:
    for line in rule.pattern:
        if not line.targets:
            raise RuleError(f"pattern line '{line.text}' names no output")
        if not line.function[:1].isupper():
            raise RuleError(f"pattern line '{line.text}' calls '{line.function}', not an ONNX op")
        if line.keywords or not all(isinstance(arg, Name) for arg in line.args):
            raise RuleError(f"pattern line '{line.text}' may only pass value names")
    reached, todo = set(), [rule.root]
    while todo:
        line = todo.pop()
        reached.add(line.text)
        todo += [producers[arg.name] for arg in line.args if arg.name in producers]
    unused = [line.text for line in rule.pattern if line.text not in reached]
    if unused:
        raise RuleError(f"pattern lines not feeding the last line: {unused}")


def _check_call(line, registry, kind, bound, pattern_values) -> None:
    if line.function not in registry:
        raise RuleError(f"unknown {kind} '{line.function}' in '{line.text}'")
    for arg in [*line.args, *line.keywords.values()]:
        _check_argument(arg, line, bound, pattern_values)


def _check_argument(arg, line, bound, pattern_values) -> None:
    if isinstance(arg, Name) and arg.name not in bound:
        raise RuleError(f"unbound name '{arg.name}' in '{line.text}'")
    if isinstance(arg, Attribute) and arg.value not in pattern_values:
        raise RuleError(f"'{arg.value}.{arg.attribute}' in '{line.text}': "
                        f"'{arg.value}' is not computed by a pattern node")


def _check_result(rule, available, pattern_values) -> None:
    root_name = rule.root.targets[0]
    assigned = set()
    for line in rule.result:
        if not line.function[:1].isupper():
            raise RuleError(f"result line '{line.text}' calls '{line.function}', not an ONNX op")
        for arg in line.args:
            if isinstance(arg, Name) and arg.name not in (available | assigned) - {root_name}:
                raise RuleError(f"unbound name '{arg.name}' in result '{line.text}'")
        for key, arg in line.keywords.items():
            if key == "like":
                if not isinstance(arg, Name) or arg.name not in pattern_values:
                    raise RuleError(f"like= in '{line.text}' must name a pattern node's output")
            else:
                _check_argument(arg, line, available | pattern_values, pattern_values)
        assigned |= set(line.targets)
    if rule.result[-1].targets[:1] != (root_name,):
        raise RuleError(f"the last result line must compute '{root_name}', the pattern's output")
    if len(rule.result) >= len(rule.pattern):
        raise RuleError("the result must have fewer nodes than the pattern, so rewriting ends")
