"""Seed corpus for `test_fuzz.py`: valid policies covering every construct, and token pools.

In: nothing (plus the shipped `rules/*.rules`, read when present). Out:
`SEEDS`, valid policy texts from small to realistic; `SHORT_SEEDS`, the ones
cheap enough to mutate tens of thousands of times; `TOKENS`, the words,
literals and punctuation the mutator inserts; `SIBLINGS`, tokens that can
replace each other; `ODD_TEXT`, unicode and control
characters a lexer should refuse with a diagnostic rather than a traceback.

Every seed must load: `test_fuzz.test_every_seed_loads` keeps them valid, so a
mutation always starts from a policy the language accepts.
"""

from __future__ import annotations

from pathlib import Path

from tests.policies import REALISTIC as SHARED_REALISTIC

ROOT = Path(__file__).resolve().parents[2]

# LANGUAGE.md section 1, verbatim.
SMALLEST = "p99 > 300ms for 2m -> rollback\n"

REALISTIC = SHARED_REALISTIC

P95_METRIC = (
    "metric p95 = promql `histogram_quantile(0.95, sum by (le) "
    '(rate(http_request_duration_seconds_bucket{namespace="{{namespace}}", '
    'app="{{workload}}"}[{{window}}])))` as duration\n'
)

# Short policies, one or two constructs each, so that every construct of the
# language is a few mutations away from a broken variant of itself.
HAND_WRITTEN: tuple[str, ...] = (
    "p99 > 300ms -> rollback\n",
    "error_rate > 0.01 -> rollback\n",
    "error_rate >= 1.5% for 30s -> pause\n",
    "success_rate < 99.9% for 1m30s -> pause\n",
    "weight >= 50 and success_rate >= 99% -> promote\n",
    "step == 3 -> continue\n",
    "elapsed > 1h and step_elapsed >= 10m -> promote\n",
    "memory > 512Mi or stable.memory > 2Gi -> pause\n",
    "canary.memory - stable.memory > 500MB -> pause\n",
    "cpu > 0.5 * 2 -> pause\n",
    "request_rate < 1e3 and request_rate != 0 -> continue\n",
    "ready_pods <= 0 and not_ready_pods > 0 for 2m -> rollback\n",
    "not (p99 > 300ms) -> continue\n",
    "not absent(p99) and p50 < p90 -> promote\n",
    "-p99 < -300ms -> rollback\n",
    "p99 - -1s > .5s -> rollback\n",
    "p99 / stable.p99 > 1.2 -> pause\n",
    "(p99 + p90) / 2 > 250ms for 1h30m -> pause\n",
    "abs(canary.p99 - stable.p99) > 50ms -> pause\n",
    "avg(p99, 5m) > 300ms -> rollback\n",
    "min(success_rate, last 5) < 95% -> pause\n",
    "max(p99, 1h) > 2s -> rollback\n",
    "delta(memory, 10m) > 100Mi -> pause\n",
    "increase(restarts, 10m) >= 3 -> rollback\n",
    "count(error_rate > 5%, last 10) >= 3 -> rollback\n",
    "count(p99 > 250ms and not absent(p90), 10m) >= 5 -> pause\n",
    "avg(max(p99, last 3), 2m) > 1s -> pause\n",
    "absent(error_rate) for 5m -> pause\n",
    "true -> continue\n",
    "false or true == false -> continue\n",
    "fast: p99 > 2s -> rollback\nslow: p99 > 500ms for 2m -> rollback\n",
    "# a comment\n\nlatency: p99 > 300ms -> rollback # trailing comment\n",
    "wrapped: (p99 > 300ms\n    and error_rate > 1%) for 2m -> rollback\n",
    "crlf: p99 > 300ms -> rollback\r\nerrs: error_rate > 1% -> pause\r\n",
    "\ttabbed:\tp99\t>\t300ms\t->\trollback\n",
    "p99 > 1d -> rollback",  # no final newline
    "memory > 1KB and memory < 1TiB and memory != 3Ki -> pause\n",
    'metric queue = promql `sum(queue_depth{namespace="{{namespace}}"})` as count\n'
    "queue > 100 -> pause\n",
    'metric slow_share = promql `sum(rate(slow_total{app="{{workload}}"}[{{window}}]))'
    ' / sum(rate(all_total{app="{{workload}}"}[{{window}}]))` as ratio\n'
    "slow_share > 5% for 2m -> pause\n",
    'metric rps = promql `sum(rate(http_requests_total{namespace="{{namespace}}", '
    'pod=~"{{pod_regex}}"}[{{window}}]))` as per_second\nrps < 1 for 5m -> pause\n',
    'metric heap = promql `max(heap_bytes{service="{{service}}", track="{{track}}"})` as bytes\n'
    'metric busy = promql `sum(rate(cpu_total{app="{{workload}}"}[5m:{{interval}}]))` as cores\n'
    'metric score = promql `max(score{app="{{workload}}"} offset {{window}})` as number\n'
    "heap > 1GiB or busy > 2 or score < 0.5 -> pause\n",
    P95_METRIC + "p95 > 400ms for 2m -> rollback\nstable_cmp: p95 > stable.p95 * 1.5 -> pause\n",
)

SHIPPED: tuple[str, ...] = tuple(
    p.read_text(encoding="utf-8") for p in sorted((ROOT / "rules").glob("*.rules"))
)

SEEDS: tuple[str, ...] = (SMALLEST, REALISTIC, *HAND_WRITTEN, *SHIPPED)

# Mutating a 5 kB policy costs as much as mutating fifty one-liners and finds
# the same bugs; the mutation loop draws from the short seeds.
SHORT_SEEDS: tuple[str, ...] = tuple(s for s in SEEDS if len(s) <= 400)

TOKENS: tuple[str, ...] = (
    # keywords, actions, names
    "for", "and", "or", "not", "true", "false", "last", "metric", "promql", "as",
    "rollback", "pause", "promote", "continue", "rollbak", "stop",
    "p99", "p50", "error_rate", "success_rate", "restarts", "memory", "cpu",
    "weight", "step", "elapsed", "canary", "stable", "canary.", "stable.p99", "prod.p99",
    "avg", "min", "max", "delta", "increase", "count", "absent", "abs", "sum", "rate",
    "duration", "ratio", "bytes", "per_second", "cores", "number", "lbs",
    # literals, valid and not
    "0", "1", "3", "0.5", ".5", "5.", "1e3", "1E-3", "1e", "1e+", "1e999", "1e308",
    "300ms", "30s", "2m", "1h", "1d", "1m30s", "1h30m", "30s1m", "1m1m", "300mss", "5xs",
    "1.5%", "99.9%", "150%", "%", "512Mi", "2Gi", "500MB", "1KiB", "3kB", "7Zi",
    "0s", "-1s", "0ms", "10000000000d", "last 5", "last 0", "last 2.5", "last 1e9",
    # punctuation and operators
    "(", ")", "((", "))", ",", ".", ":", "->", "-", ">", "=>", "=", "==", "!=", "!",
    ">=", "<=", "<", "+", "*", "/", "&&", "||", "&", "|", "'", '"', "#", "`", "``",
    "{{namespace}}", "{{nope}}", "{{", "}}", "\\", "[", "]", "{", "}", ";", "?", "@",
    # layout
    " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\f", "\v",
)

# Tokens that can stand in for each other, mostly keeping a policy valid: such
# mutants reach the evaluator with new thresholds, operators and actions.
SIBLINGS: tuple[tuple[str, ...], ...] = (
    (">", ">=", "<", "<=", "==", "!="),
    ("rollback", "pause", "promote", "continue"),
    ("and", "or"),
    ("+", "-"),
    ("*", "/"),
    ("avg", "min", "max", "delta", "increase"),
    ("p50", "p90", "p99"),
    ("error_rate", "success_rate"),
    ("ready_pods", "not_ready_pods", "failed_pods", "restarts"),
    ("canary", "stable"),
    ("300ms", "250ms", "30s", "2m", "5m", "10m", "1h", "1m30s", "1d", "100ms", "1s", "3m"),
    ("1%", "1.5%", "0.5%", "5%", "99%", "99.9%", "95%", "0%", "100%"),
    ("512Mi", "2Gi", "500MB", "100Mi", "1GiB", "1KB"),
    ("0", "1", "2", "3", "5", "0.5", "1.5", "10", "50", "100", "1e3"),
)

ODD_TEXT: tuple[str, ...] = (
    "\x00", "\x01", "\x07", "\x1b[31m", "\x7f", "\x85", "\xa0", "\xad",
    "\u200b", "\u200e", "\u200f", "\u202e", "\u2028", "\u2029", "\u2066", "\ufeff",
    "\u0301", "e\u0301", "\u0338", "\u20dd",
    "３００ms", "\uff10", "\uff15m", "٣", "٣٠٠ms", "\u0966\u0967", "\U0001d7d8",
    "²", "½", "Ⅻ", "⁵", "µs", "ｐ９９", "ｒｏｌｌｂａｃｋ", "→", "−", "≥", "≤", "∧",
    "ℌ", "ﬁ", "ǅ", "İ", "ß", "Σ", "ςσ", "\U0001f600", "\U0001f1fa\U0001f1f8",
    "\ufffd", "\uffff", "\U0010ffff", "\ue000",
)
