"""What `optimize` did: the numbers a person reads at a glance, and the JSON a pipeline keeps."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx

from .plan import Miss
from .modelio import encoded_size
from .text import table

# Ops whose presence after optimizing the user will ask about.
_WATCHED = {"Add", "Sub", "Mul", "BatchNormalization", "AveragePool"}


def model_stats(model: onnx.ModelProto) -> dict:
    ops = Counter(node.op_type for node in model.graph.node)
    parameters = sum(math.prod(t.dims) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            parameters += sum(math.prod(a.t.dims) for a in node.attribute if a.name == "value")
    return {"nodes": len(model.graph.node), "parameters": parameters,
            "bytes": encoded_size(model), "ops": dict(sorted(ops.items()))}


def unexplained_leftovers(graph, misses) -> list:
    """A reason for every watched node left that no rule even partly matched."""
    explained = {node for (_, node) in misses}
    leftovers = []
    for node in graph.nodes:
        if node.op in _WATCHED and node.name not in explained:
            sources = ", ".join(t.inputs[0].op if t.inputs else "input" for t in node.inputs[:2])
            leftovers.append(Miss("-", node.name, f"no rule's pattern matches {node.op} fed by {sources}"))
    return leftovers


@dataclass
class Report:
    before: dict
    after: dict
    seconds: float
    normalized: dict
    rewrites: list
    misses: list
    rules: list
    frozen_inputs: list = field(default_factory=list)  # weights that stopped being graph inputs
    warnings: list = field(default_factory=list)  # one line each, for the user
    verification: dict | None = field(default=None)

    def fired(self) -> dict:
        return dict(sorted(Counter(r.rule for r in self.rewrites).items()))

    def to_dict(self) -> dict:
        return {
            "before": self.before,
            "after": self.after,
            "seconds": round(self.seconds, 4),
            "normalized": self.normalized,
            "rules_fired": self.fired(),
            "rewrites": [asdict(r) for r in self.rewrites],
            "not_applied": [asdict(m) for m in self.misses],
            "rules": self.rules,
            "frozen_weight_inputs": self.frozen_inputs,
            "warnings": self.warnings,
            "verification": self.verification,
        }

    def render(self, explain=False) -> str:
        lines = [_op_table(self.before["ops"], self.after["ops"]), ""]
        for label, key, unit in (("nodes", "nodes", ""), ("parameters", "parameters", ""),
                                 ("model size", "bytes", " B")):
            lines.append(f"{label:<12}{self.before[key]:>12,}{unit} -> {self.after[key]:>12,}{unit}")
        lines.append(f"{'time':<12}{self.seconds:>12.3f} s")
        if self.frozen_inputs:
            lines.append(f"froze {len(self.frozen_inputs)} weights that were graph inputs "
                         f"(e.g. '{self.frozen_inputs[0]}'): they are no longer inputs")
        fired = self.fired()
        lines.append("rules fired: " + (", ".join(f"{k} x{v}" for k, v in fired.items()) or "none"))
        cleaned = {k: v for k, v in self.normalized.items() if v}
        if cleaned:
            lines.append("cleaned up:  " + ", ".join(f"{k} x{v}" for k, v in cleaned.items()))
        if self.verification is not None:
            culprits = self.verification["culprits"]
            verdict = "passed" if self.verification["passed"] else "FAILED"
            blame = f" (rewrites of {', '.join(culprits)} broke it)" if culprits else ""
            lines.append(f"parity in onnxruntime: {verdict}{blame}")
        if explain:
            lines += ["", "not applied:" if self.misses else "not applied: nothing left to explain"]
            lines += [_explain_line(m) for m in self.misses]
        elif self.misses:
            lines.append(f"{len(self.misses)} places a rule did not apply: see --explain")
        return "\n".join(lines)

    def changes(self) -> list:
        """What optimizing changed, one item each (`optimize --check`). Empty means the input
        was already optimized: no rule fired, no clean-up changed anything, no weight input
        was frozen, and the graph kept every node, op and weight (the graph's own clean-up of
        dead nodes and unused weights counts too). A newer IR version alone is no change."""
        changes = [f"{name} x{count}" for name, count in self.fired().items()]
        changes += [f"{name} x{count}" for name, count in self.normalized.items() if count]
        if self.frozen_inputs:
            changes.append(f"froze {len(self.frozen_inputs)} weight inputs")
        if not changes and any(self.before[key] != self.after[key] for key in ("nodes", "ops", "parameters")):
            changes.append("removed unused nodes or weights")
        return changes


def _op_table(before: dict, after: dict) -> str:
    ops = sorted(set(before) | set(after), key=lambda op: (-before.get(op, 0), op))
    rows = []
    for op in ops:
        b, a = before.get(op, 0), after.get(op, 0)
        rows.append([op, b, a, "" if a == b else f"({a - b:+d})"])
    return "\n".join(table(["op", "before", "after", ""], rows, align="<>>"))


def _explain_line(miss) -> str:
    """`node: rule: reason`, then the values the reason is about, to find them in Netron."""
    about = f"  (values: {', '.join(miss.values)})" if miss.values else ""
    return f"  {miss.node}: {miss.rule}: {miss.reason}{about}"
