"""`optimize --verify`: check parity, and when it fails, find the rule that broke it."""

from __future__ import annotations

from .optimize import optimize
from .verify import verify_models


def verify_optimization(original, optimized, rules, report, freeze_weight_inputs=False, parity=None) -> dict:
    """Parity of `optimized` against `original`; on failure, name the rules to blame.

    `parity`: settings for verify_models (shapes, inputs, tolerances, ...), as `verify` takes.
    A rule is blamed when optimizing without it (and with every other rule) passes.
    """
    parity = dict(parity or {}, latency=False)
    check = verify_models(original, optimized, **parity)
    result = {"passed": check.passed, "parity": check.to_dict(), "culprits": []}
    if check.passed:
        return result
    for name in report.fired():
        without = [rule for rule in rules if rule.name != name]
        candidate, _ = optimize(original, rules=without, freeze_weight_inputs=freeze_weight_inputs)
        if verify_models(original, candidate, **parity).passed:
            result["culprits"].append(name)
    return result
