"""Policies the tests share, as LANGUAGE.md (FIXED sections) writes them."""

# LANGUAGE.md section 1, the realistic policy, verbatim.
REALISTIC = """\
# checkout service: what a healthy canary looks like
latency:   p99 > 300ms for 2m -> rollback
errors:    error_rate > 1% for 1m -> rollback
relative:  canary.p99 > stable.p99 * 1.5 and canary.p99 > 100ms for 3m -> pause
crashing:  failed_pods > 0 or increase(restarts, 5m) >= 3 -> rollback
flapping:  count(p99 > 250ms, 10m) >= 5 -> pause
no_data:   absent(p99) for 5m -> pause
early_win: weight >= 50 and success_rate >= 99.9% for 10m -> promote
"""

# The same rules without the comment line.
REALISTIC_RULES = REALISTIC.split("\n", 1)[1]
