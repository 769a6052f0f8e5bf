"""What: loading and validating the declarative rule files in `rules/` (one line's syntax:
rulesyntax.py).

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
Rules rooted at one op are tried in order of `benefit`, higher first, then by name; it is
the number of pattern lines unless the file sets `benefit = N` (MLIR's DRR does the same:
the bigger pattern first, so a smaller one does not take part of its match).
"""

from __future__ import annotations

import os

import inspect
import tomllib
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import onnx

from .cleanups import NAMES as CLEANUP_NAMES
from .errors import OnnxfoldError
from .predicates import PREDICATES
from .rulesyntax import Attribute, Call, Literal, Name, RuleError, parse_call, parse_lines
from .transforms import TRANSFORMS

COMMUTATIVE = {"Add", "Mul"}


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
    benefit: int = 0  # the order among rules rooted at one op: higher first
    merge_step: Call | None = None  # where a rewrite that raises the cost may still be done

    @property
    def root(self) -> Call:
        return self.pattern[-1]

    @cached_property
    def compute_arguments(self) -> frozenset:
        """Names of the pattern values the compute lines read."""
        return frozenset(arg.name for line in self.compute for arg in line.args if isinstance(arg, Name))

    @cached_property
    def weight_names(self) -> frozenset:
        """Names of the computed values that become weights (result inputs)."""
        computed = {target for line in self.compute for target in line.targets}
        return frozenset(arg.name for line in self.result for arg in line.args
                         if isinstance(arg, Name) and arg.name in computed)

    @cached_property
    def producers(self) -> dict:
        """Pattern value name -> the pattern line that computes it."""
        return {target: line for line in self.pattern for target in line.targets}

    @cached_property
    def root_feeders(self) -> tuple:
        """The ops of the pattern lines whose outputs the root reads."""
        return tuple(self.producers[arg.name].function for arg in self.root.args
                     if isinstance(arg, Name) and arg.name in self.producers)


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
            problem = "is a file, not a folder of rule files" if folder.exists() else "does not exist"
            raise OnnxfoldError(f"the rules folder {problem}", folder)
        for path in sorted(folder.glob("*.toml")):
            rule = load_rule_file(path)
            if rule.name in seen:
                raise OnnxfoldError(f"rule '{rule.name}' is already defined in {seen[rule.name]}", path)
            if rule.name in CLEANUP_NAMES:  # --only/--skip would select both
                raise OnnxfoldError(f"rule '{rule.name}' has the name of a clean-up", path)
            seen[rule.name] = path
            rules.append(rule)
    return rules


# Parsed and checked rules by (path, modification time, size): checking a rule file costs
# milliseconds, and a program that optimizes many models loads the same files each time.
_PARSED: dict = {}


def load_rule_file(path) -> Rule:
    path = Path(path)
    try:
        stat = path.stat()
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)  # resolve() costs a stat per folder
    except OSError:
        key = None  # the read below says what is wrong
    if key in _PARSED:
        return _PARSED[key]
    rule = _parse_rule_file(path)
    if key is not None:
        _PARSED[key] = rule
    return rule


def _parse_rule_file(path) -> Rule:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise OnnxfoldError(f"not a readable rule file ({error})", path) from None
    try:
        rule = _build_rule(data, path)
        _validate(rule)
    except RuleError as error:
        name = data.get("name", path.stem)
        raise OnnxfoldError(f"rule '{name if isinstance(name, str) else path.stem}': {error}", path) from None
    return rule


_KEYS = ("name", "summary", "description", "benefit", "pattern", "when", "compute", "result", "examples",
         "counterexamples", "merge_step")


def _build_rule(data, path) -> Rule:
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:  # a misspelt `when` would otherwise drop every condition, silently
        raise RuleError(f"unknown key '{unknown[0]}' (a rule file has {', '.join(_KEYS)})")
    for key in ("summary", "pattern", "result"):
        if not isinstance(data.get(key), str):
            raise RuleError(f"'{key}' is missing or not a string")
    if not isinstance(data.get("description", ""), str):
        raise RuleError("'description' is not a string")
    pattern = parse_lines(data["pattern"])
    return Rule(
        name=_rule_name(data, path),
        summary=data["summary"],
        description=data.get("description", "").strip(),
        pattern=pattern,
        when=[parse_call(text) for text in _strings(data, "when")],
        compute=[parse_call(text) for text in _strings(data, "compute")],
        result=parse_lines(data["result"]),
        examples=_cases(data, "examples", ()),
        counterexamples=_cases(data, "counterexamples", ("reason",)),
        source=str(path),
        benefit=_benefit(data, pattern),
        merge_step=_merge_step(data),
    )


def _rule_name(data, path) -> str:
    name = data.get("name", path.stem)
    # --only and --skip take names separated by commas.
    if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
        raise RuleError(f"'name' must be a string without spaces or commas, not {name!r}")
    return name


def _benefit(data, pattern) -> int:
    benefit = data.get("benefit", len(pattern))
    if isinstance(benefit, bool) or not isinstance(benefit, int) or benefit < 0:
        raise RuleError(f"'benefit' must be a whole number, 0 or more, not {benefit!r}")
    return benefit


def _merge_step(data):
    """`merge_step`: a predicate that, where the rewrite raises the parameters or
    multiply-adds (plan.py's cost guard), must hold for it to be done anyway."""
    if "merge_step" not in data:
        return None
    if not isinstance(data["merge_step"], str):
        raise RuleError("'merge_step' must be a string: one predicate call")
    return parse_call(data["merge_step"])


def _strings(data, key) -> list:
    texts = data.get(key, [])
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise RuleError(f"'{key}' must be a list of strings")
    return texts


def _cases(data, key, required) -> list:
    """`examples` / `counterexamples`: tables with a `model`, maybe `data` and `reason`."""
    cases = data.get(key, [])
    if not isinstance(cases, list) or not all(isinstance(case, dict) for case in cases):
        raise RuleError(f"'{key}' must be a list of tables ([[{key}]])")
    for index, case in enumerate(cases):
        where = f"{key} {index + 1}"
        unknown = sorted(set(case) - {"model", "data", "reason"})
        if unknown:
            raise RuleError(f"{where}: unknown key '{unknown[0]}'")
        for field_name in ("model", *required):
            if not isinstance(case.get(field_name), str):
                raise RuleError(f"{where}: '{field_name}' is missing or not a string")
        if "reason" in case and not isinstance(case["reason"], str):
            raise RuleError(f"{where}: 'reason' is not a string")
        if "data" in case and not (isinstance(case["data"], list) and all(isinstance(n, str) for n in case["data"])):
            raise RuleError(f"{where}: 'data' must be a list of input names")
    return cases


# --- validation ------------------------------------------------------------------------

def _validate(rule: Rule) -> None:
    _check_pattern(rule)
    producers = rule.producers
    pattern_values = set(producers)
    free_values = {arg.name for line in rule.pattern for arg in line.args
                   if isinstance(arg, Name) and arg.name not in pattern_values}
    bound = pattern_values | free_values
    for line in rule.when + ([rule.merge_step] if rule.merge_step else []):
        _check_call(line, PREDICATES, "predicate", bound, producers)
        if line.targets:
            raise RuleError(f"when line '{line.text}' assigns names: a predicate only holds or not")
    for line in rule.compute:
        _check_call(line, TRANSFORMS, "transform", bound, producers)
        if not line.targets:
            raise RuleError(f"compute line '{line.text}' names no result")
        _check_new_names(line, bound)
        bound = bound | set(line.targets)
    _check_result(rule, bound - pattern_values | {rule.root.targets[0]}, producers)


def _check_pattern(rule) -> None:
    for line in rule.pattern:
        if not line.targets:
            raise RuleError(f"pattern line '{line.text}' names no output")
        _check_op(line, "pattern")
        if line.keywords or not all(isinstance(arg, Name) for arg in line.args):
            raise RuleError(f"pattern line '{line.text}' may only pass value names")
    assigned = set()
    for line in rule.pattern:
        _check_new_names(line, assigned)
        assigned |= set(line.targets)
    cycle = _find_cycle(rule.root, rule.producers)
    if cycle:
        raise RuleError(f"the pattern is cyclic: {' -> '.join(cycle)} (a value feeds the line that computes it)")
    reached, todo = set(), [rule.root]
    while todo:
        line = todo.pop()
        if line.text not in reached:
            reached.add(line.text)
            todo += [rule.producers[arg.name] for arg in line.args if arg.name in rule.producers]
    unused = [line.text for line in rule.pattern if line.text not in reached]
    if unused:
        raise RuleError(f"pattern lines not feeding the last line: {unused}")


def _find_cycle(root, producers):
    """Value names around a cycle among the lines that feed `root` (first repeated), or None.

    Matching walks from the root up through producers, so a cycle could never match a graph.
    """
    path, done = [], set()

    def visit(name):
        if name in path:
            return [*path[path.index(name):], name]
        if name in done or name not in producers:
            return None
        path.append(name)
        for arg in producers[name].args:
            cycle = visit(arg.name)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    return visit(root.targets[0])


def _check_new_names(line, taken) -> None:
    """A line may not assign a name already given a value: the rule would read the wrong one."""
    seen = set(taken)
    for target in line.targets:
        if target in seen:
            raise RuleError(f"'{line.text}' assigns '{target}', which already has a value")
        seen.add(target)


@cache
def _onnx_attributes(op: str) -> frozenset | None:
    """Every attribute name the ONNX op has had, in any opset of the default domain; None
    for a name that is no ONNX op. One op's versions, newest first: reading every schema
    of every op costs 40 ms of each command."""
    if not onnx.defs.has(op):
        return None
    names, version = set(), onnx.defs.onnx_opset_version()
    while version > 0:
        try:
            schema = onnx.defs.get_schema(op, version, "")
        except onnx.defs.SchemaError:
            break
        names.update(schema.attributes)
        version = schema.since_version - 1
    return frozenset(names)


@cache
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _check_op(line, kind) -> None:
    if _onnx_attributes(line.function) is None:
        raise RuleError(f"{kind} line '{line.text}' calls '{line.function}', not an ONNX op")


def _check_call(line, registry, kind, bound, producers) -> None:
    if line.function not in registry:
        raise RuleError(f"unknown {kind} '{line.function}' in '{line.text}'")
    if line.keywords:
        raise RuleError(f"'{line.text}': a {kind} takes no keywords")
    try:
        _signature(registry[line.function]).bind(*line.args)
    except TypeError as error:
        raise RuleError(f"'{line.text}': {error}") from None
    for arg in line.args:
        _check_argument(arg, line, bound, producers)


def _check_argument(arg, line, bound, producers) -> None:
    if isinstance(arg, Name) and arg.name not in bound:
        raise RuleError(f"unbound name '{arg.name}' in '{line.text}'")
    if isinstance(arg, Attribute):
        if arg.value not in producers:
            raise RuleError(f"'{arg.value}.{arg.attribute}' in '{line.text}': "
                            f"'{arg.value}' is not computed by a pattern node")
        op = producers[arg.value].function
        if arg.attribute not in (_onnx_attributes(op) or ()):
            raise RuleError(f"'{arg.value}.{arg.attribute}' in '{line.text}': {op} has no attribute "
                            f"'{arg.attribute}'")


def _check_result(rule, available, producers) -> None:
    root_name = rule.root.targets[0]
    assigned = set()
    for line in rule.result:
        _check_op(line, "result")
        if not line.targets:
            raise RuleError(f"result line '{line.text}' names no output")
        for arg in line.args:
            if isinstance(arg, Literal) and arg.value is None:
                continue  # an omitted optional input
            if not isinstance(arg, Name) or arg.name not in (available | assigned) - {root_name}:
                raise RuleError(f"'{_text(arg)}' in result '{line.text}' is not a value computed before it")
        for key, arg in line.keywords.items():
            _check_keyword(key, arg, line, available | set(producers), producers)
        _check_new_names(line, assigned | available - {root_name})
        assigned |= set(line.targets)
    if rule.result[-1].targets[:1] != (root_name,):
        raise RuleError(f"the last result line must compute '{root_name}', the pattern's output")
    if len(rule.result) >= len(rule.pattern):
        raise RuleError("the result must have fewer nodes than the pattern, so rewriting ends")


def _check_keyword(key, arg, line, bound, producers) -> None:
    if key == "like":
        if not isinstance(arg, Name) or arg.name not in producers:
            raise RuleError(f"like= in '{line.text}' must name a pattern node's output")
        return
    if key not in (_onnx_attributes(line.function) or ()):
        raise RuleError(f"'{line.text}': {line.function} has no attribute '{key}'")
    if isinstance(arg, Literal) and arg.value in (None, [], ()):
        raise RuleError(f"'{line.text}': {key}={arg.value!r} is no attribute value")
    _check_argument(arg, line, bound, producers)


def _text(arg) -> str:
    if isinstance(arg, Name):
        return arg.name
    if isinstance(arg, Attribute):
        return f"{arg.value}.{arg.attribute}"
    return repr(arg.value)
