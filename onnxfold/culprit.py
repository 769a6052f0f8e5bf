"""`optimize --verify`: check parity, and when it fails, find the rule that broke it."""

from __future__ import annotations

from .optimize import optimize
from .verify import verify_models


def verify_optimization(original, optimized, rules, report, freeze_weight_inputs=False) -> dict:
    """Parity of `optimized` against `original`; on failure, name the rules to blame.

    A rule is blamed when optimizing without it (and with every other rule) passes.
    """
    check = verify_models(original, optimized, latency=False)
    result = {"passed": check.passed, "parity": check.to_dict(), "culprits": []}
    if check.passed:
        return result
    for name in report.fired():
        without = [rule for rule in rules if rule.name != name]
        candidate, _ = optimize(original, rules=without, freeze_weight_inputs=freeze_weight_inputs)
        if verify_models(original, candidate, latency=False).passed:
            result["culprits"].append(name)
    return result
