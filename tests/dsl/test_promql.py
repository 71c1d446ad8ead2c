"""Metric query templates (dsl/promql.py): rendering, diagnostics, and injection safety.

The safety tests do not trust dsl.promql's own tokeniser: they lex queries with
the small PromQL string lexer below and decode string literals with Go's
unquoting rules (what Prometheus does), and, when promtool is installed, have
Prometheus' own parser read the rendered queries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.ast import Dim, MetricDef
from dsl.diagnostics import render as render_diagnostic
from dsl.parser import parse
from dsl.promql import (
    PLACEHOLDERS,
    Place,
    Placeholder,
    Template,
    TemplateError,
    Text,
    check_template,
    escape_label_value,
    escape_regex,
    parse_template,
    prometheus_duration,
    render,
)

# --- an independent PromQL string lexer and Go unquoting --------------------------

STRING = "\x00"  # stands for a string literal in the code outside strings


def lex(query: str) -> tuple[str, list[str]]:
    """The query outside strings (comments dropped, each string as STRING) and the strings."""
    code: list[str] = []
    strings: list[str] = []
    i = 0
    while i < len(query):
        ch = query[i]
        if ch in "\"'":
            j = i + 1
            while query[j] != ch:  # IndexError: unterminated, which fails the test
                assert query[j] != "\n", f"raw newline in a string of {query!r}"
                j += 2 if query[j] == "\\" else 1
            strings.append(query[i : j + 1])
            code.append(STRING)
            i = j + 1
        elif ch == "#":
            end = query.find("\n", i)
            i = len(query) if end < 0 else end
        else:
            code.append(ch)
            i += 1
    return "".join(code), strings


_GO_SIMPLE = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def go_unquote(literal: str) -> str:
    """strconv.Unquote for a PromQL string literal; ValueError where Go reports an error."""
    quote, body = literal[0], literal[1:-1]
    if literal[-1] != quote or len(literal) < 2:
        raise ValueError("not a quoted string")
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch in (quote, "\n"):
            raise ValueError(f"raw {ch!r} inside the string")
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        esc = body[i + 1 : i + 2]
        if esc in _GO_SIMPLE:
            out.append(_GO_SIMPLE[esc])
            i += 2
        elif esc == quote:
            out += quote.encode()
            i += 2
        elif esc and esc in "01234567":
            digits = body[i + 1 : i + 4]
            if not re.fullmatch("[0-7]{3}", digits) or int(digits, 8) > 255:
                raise ValueError("bad octal escape")
            out.append(int(digits, 8))  # a byte, as Go does
            i += 4
        elif esc in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 2 : i + 2 + width]
            if not re.fullmatch(f"[0-9a-fA-F]{{{width}}}", digits):
                raise ValueError("bad hex escape")
            value = int(digits, 16)
            if esc == "x":
                out.append(value)  # a byte, not a character
            elif value > 0x10FFFF or 0xD800 <= value < 0xE000:
                raise ValueError("not a character")
            else:
                out += chr(value).encode("utf-8")
            i += 2 + width
        else:
            raise ValueError(f"unknown escape {esc!r}")
    return out.decode("utf-8")  # strict: invalid UTF-8 is an error


def test_the_oracle_sees_an_injection() -> None:
    """The lexer must notice naive substitution, or the safety tests below prove nothing."""
    template = 'sum(rate(x{app="{{workload}}"}[5m]))'
    naive = template.replace("{{workload}}", '"}[5m]) or vector(1) #')
    assert lex(naive)[0] != lex(template)[0]
    assert go_unquote(r'"a\"b\\c\n\x41\u2603\U0001F600\101"') == 'a"b\\c\nA☃😀A'
    for bad in (r'"\q"', r'"\x4"', r'"\ud800"', r'"\xff"', '"a\nb"', r'"\'"'):
        with pytest.raises(ValueError):
            go_unquote(bad)


# --- rendering ----------------------------------------------------------------------

VALUES = {
    "namespace": "shop",
    "workload": "checkout-canary",
    "track": "canary",
    "service": "checkout",
    "pod_regex": "checkout-canary-[a-z0-9]+-[a-z0-9]+",
    "window": "1m",
    "interval": "30s",
}

P99 = (
    "histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{"
    'destination_workload_namespace="{{namespace}}", destination_workload="{{ workload }}"'
    "}[{{window}}]))) / 1000"
)
ERRORS = (
    'sum(rate(http_requests_total{namespace="{{namespace}}", pod=~"{{pod_regex}}", code=~"5.."}'
    '[{{window}}])) / sum(rate(http_requests_total{namespace="{{namespace}}", '
    'pod=~"{{pod_regex}}"}[{{window}}]))'
)
RESTARTS = (
    "max_over_time(sum(kube_pod_container_status_restarts_total{namespace='kube',"
    ' pod=~"{{pod_regex}}"})[{{window}}:{{interval}}]) # restarts of {{track}}'
)
CPU = (
    'sum(rate(container_cpu_usage_seconds_total{namespace="{{namespace}}",\n'
    '  container!="", service=~"{{service}}-v[0-9]+", track="{{track}}"}[5m] offset {{interval}}))'
)
GOOD_TEMPLATES = (P99, ERRORS, RESTARTS, CPU)


def test_render_fills_each_placeholder_in_its_place() -> None:
    assert render(P99, VALUES) == (
        "histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{"
        'destination_workload_namespace="shop", destination_workload="checkout-canary"'
        "}[1m]))) / 1000"
    )
    assert render(RESTARTS, VALUES) == (
        "max_over_time(sum(kube_pod_container_status_restarts_total{namespace='kube',"
        ' pod=~"checkout-canary-[a-z0-9]+-[a-z0-9]+"})[1m:30s]) # restarts of {{track}}'
    )
    assert render(CPU, {**VALUES, "service": "check.out"}) == (
        'sum(rate(container_cpu_usage_seconds_total{namespace="shop",\n'
        '  container!="", service=~"check\\\\.out-v[0-9]+", track="canary"}[5m] offset 30s))'
    )


def test_template_records_its_unit_and_placeholders() -> None:
    source = f"metric errors = promql `{ERRORS}` as ratio\n"
    tree, diagnostics = parse(source)
    assert tree is not None and diagnostics == []
    (defn,) = [s for s in tree.statements if isinstance(s, MetricDef)]
    template = Template.from_definition(defn)
    assert template.dim is Dim.RATIO
    assert template.placeholders == {"namespace", "pod_regex", "window"}
    assert template.render(VALUES) == render(ERRORS, VALUES)


def test_segments_tile_the_template_and_know_their_place() -> None:
    segments = parse_template(P99)
    assert "".join(s.text if isinstance(s, Text) else P99[s.start : s.end] for s in segments) == P99
    places = {s.name: s.place for s in segments if isinstance(s, Placeholder)}
    assert places == {
        "namespace": Place.LABEL,
        "workload": Place.LABEL,
        "window": Place.DURATION,
    }
    assert [s.place for s in parse_template(ERRORS) if isinstance(s, Placeholder)][1] is (
        Place.REGEX
    )


def test_a_missing_value_is_named() -> None:
    values = {k: v for k, v in VALUES.items() if k != "window"}
    with pytest.raises(KeyError) as caught:
        render(P99, values)
    assert caught.value.args == ("window",)


@pytest.mark.parametrize(
    "window", ["1m]) or vector(1) #", "5 m", "1m\n", "", "1.5m", "\u0661m", "1M", "m", "-1m"]
)
def test_a_window_must_be_a_prometheus_duration(window: str) -> None:
    with pytest.raises(ValueError, match="Prometheus duration"):
        render(P99, {**VALUES, "window": window})


@pytest.mark.parametrize("window", ["1m", "90s", "1h30m", "250ms", "2d", "1w", "1y"])
def test_prometheus_durations_are_accepted(window: str) -> None:
    assert f"[{window}]" in render(P99, {**VALUES, "window": window})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(60, "1m"), (90, "1m30s"), (0.25, "250ms"), (3600, "1h"), (86400 + 1.5, "1d1s500ms")],
)
def test_a_window_in_seconds_becomes_a_prometheus_duration(seconds: float, text: str) -> None:
    assert prometheus_duration(seconds) == text
    assert f"[{text}]" in render(P99, {**VALUES, "window": prometheus_duration(seconds)})


@pytest.mark.parametrize("seconds", [0, 0.0004, -60, float("inf"), float("nan")])
def test_a_window_that_is_not_a_positive_duration_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="positive duration"):
        prometheus_duration(seconds)


def test_render_refuses_a_template_the_check_rejects() -> None:
    """A template may reach render without a check; it still never substitutes unsafely."""
    with pytest.raises(TemplateError, match="outside a quoted label value") as caught:
        render("sum(rate(x[5m])) > {{workload}}", VALUES)
    assert caught.value.code == "E402"
    with pytest.raises(TemplateError, match="unknown placeholder"):
        render('x{a="{{workloads}}"}', VALUES)
    with pytest.raises(TemplateError, match="never closed"):
        render('x{a="{{workload}}}', VALUES)


# --- escaping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("checkout", "checkout"),
        ('a"b', 'a\\"b'),
        ("a\\b", "a\\\\b"),
        ("ends\\", "ends\\\\"),
        ("l1\nl2\r\t", "l1\\nl2\\r\\t"),
        ("\x00\x1b\x7f", "\\x00\\x1b\\x7f"),
        ("\a\b\f\v", "\\a\\b\\f\\v"),
        ("\u0085\u2028\u202e\ufeff", "\\u0085\\u2028\\u202e\\ufeff"),
        ("\U000e0001", "\\U000e0001"),
        ("☃ 雪 é 😀 'q'", "☃ 雪 é 😀 'q'"),
    ],
)
def test_escape_label_value_follows_go(value: str, escaped: str) -> None:
    assert escape_label_value(value) == escaped
    assert go_unquote(f'"{escaped}"') == value


def test_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        escape_label_value("a\ud800")


def test_escape_regex_escapes_re2_then_the_string() -> None:
    value = "a.b*c\\(d)[e]{f}|g^h$i?+"
    escaped = escape_regex(value)
    assert (
        escaped
        == "a\\\\.b\\\\*c\\\\\\\\\\\\(d\\\\)\\\\[e\\\\]\\\\{f\\\\}\\\\|g\\\\^h\\\\$i\\\\?\\\\+"
    )
    regex = go_unquote(f'"{escaped}"')
    assert re.fullmatch(regex, value)
    assert not re.fullmatch(regex, value.replace(".", "x"))


def test_a_placeholder_in_a_regex_matcher_matches_only_itself() -> None:
    template = 'up{service=~"{{service}}", job!~ "{{workload}}-.*", pod=~"{{pod_regex}}"}'
    query = render(template, {**VALUES, "service": "a.b", "workload": "w+"})
    strings = [go_unquote(s) for s in lex(query)[1]]
    # pod_regex is a regex by definition, so it is quoted but not regex-escaped
    assert strings == ["a\\.b", "w\\+-.*", VALUES["pod_regex"]]


# --- hostile values cannot change a query's meaning ------------------------------------

HOSTILE = [
    '"}[5m]) or vector(1) #',
    '"} or vector(1) or up{a="',
    'a"b',
    "\\",
    "ends with a backslash\\",
    '\\"',
    "line1\nline2",
    "tab\there\r\n",
    "\x00nul\x1b[31m",
    "\u0085\u2028\u2029",
    "\u202eevil",
    "☃ 雪 😀 é",
    "'single' `back`",
    "{{workload}}",
    "# not a comment",
    ".*",
    "",
]
HOSTILE_TEMPLATE = (
    "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{"
    'namespace="{{namespace}}", deployment="{{workload}}", track="v-{{track}}-x",'
    ' service=~"{{service}}(-canary)?"}[{{window}}] offset {{interval}}))) # {{track}}'
)


def _values(hostile: str) -> dict[str, str]:
    return {
        **VALUES,
        "namespace": hostile,
        "workload": hostile,
        "track": hostile,
        "service": hostile,
    }


def _expected_code(template: str) -> str:
    """The template's code outside strings, durations filled with the values tests use."""
    template = re.sub(r"\{\{[ \t]*window[ \t]*\}\}", "1m", template)
    return lex(re.sub(r"\{\{[ \t]*interval[ \t]*\}\}", "30s", template))[0]


def _assert_only_strings_differ(query: str, hostile: str) -> None:
    code, strings = lex(query)
    assert code == _expected_code(HOSTILE_TEMPLATE)
    decoded = [go_unquote(s) for s in strings]
    assert decoded[:3] == [hostile, hostile, f"v-{hostile}-x"]
    assert decoded[3].endswith("(-canary)?")
    assert re.fullmatch(decoded[3], hostile)
    assert re.fullmatch(decoded[3], hostile + "-canary")


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_hostile_value_stays_inside_its_string(hostile: str) -> None:
    _assert_only_strings_differ(render(HOSTILE_TEMPLATE, _values(hostile)), hostile)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_value_stays_inside_its_string(value: str) -> None:
    _assert_only_strings_differ(render(HOSTILE_TEMPLATE, _values(value)), value)


_SELECTORS = st.sampled_from(
    [
        "up",
        'x{a="{{workload}}"}',
        'x{a=~"p-{{track}}.*", b!="c"}',
        "x{a='q', b=\"{{namespace}}\"}",
        'x{a="\\"{{workload}}\\\\", b!~ "\\x41{{service}}"}',
        'x{pod=~"{{pod_regex}}"}',
        "1",
    ]
)
_TEMPLATES = st.recursive(
    _SELECTORS,
    lambda inner: st.one_of(
        inner.map(lambda e: f"sum by (le) ({e})"),
        inner.map(lambda e: f"rate({e}[{{{{window}}}}])"),
        inner.map(lambda e: f"max_over_time({e}[{{{{window}}}}:{{{{interval}}}}])"),
        inner.map(lambda e: f"{e} offset {{{{interval}}}}"),
        inner.map(lambda e: f'{e} # {{{{workload}}}} "\n'),
        st.tuples(inner, inner).map(" / ".join),
    ),
    max_leaves=4,
)
# Noise that breaks the structure, to probe the tokeniser's edges.
_FRAGMENTS = st.sampled_from(
    [
        '"',
        "'",
        "{",
        "}",
        "[",
        "]",
        "(",
        ")",
        "#",
        "\n",
        " ",
        "=~",
        ":",
        "\\",
        "\\n",
        "offset ",
        "{{workload}}",
        "{{window}}",
        "{{track}}",
        "{{",
        "}}",
    ]
)


def _insert(template: str, noise: list[tuple[int, str]]) -> str:
    for at, fragment in noise:
        at %= len(template) + 1
        template = template[:at] + fragment + template[at:]
    return template


_NOISY_TEMPLATES = st.builds(
    _insert, _TEMPLATES, st.lists(st.tuples(st.integers(0, 500), _FRAGMENTS), max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(_NOISY_TEMPLATES, st.text(max_size=20))
def test_any_template_the_check_accepts_keeps_its_structure(template: str, value: str) -> None:
    """Random templates: the tokeniser never crashes, and whatever it accepts is safe."""
    try:
        built = Template(template, Dim.NUMBER)
    except TemplateError as e:
        assert e.code in {"E401", "E402", "E405"}
        return
    query = built.render({**_values(value), "window": "1m", "interval": "30s"})
    code, strings = lex(query)
    assert code == _expected_code(template)
    for s in strings:
        go_unquote(s)


# --- promtool: Prometheus' own parser reads the rendered queries --------------------------


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not found: apt-get install prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _check_rules(
    promtool: str, queries: list[str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    rules = [{"alert": f"Q{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "rendered.rules.yml"
    # JSON is YAML; ensure_ascii=False keeps astral characters out of surrogate pairs
    path.write_text(json.dumps({"groups": [{"name": "g", "rules": rules}]}, ensure_ascii=False))
    return subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def test_promtool_parses_every_rendered_query(tmp_path: Path) -> None:
    promtool = _promtool()
    queries = [render(t, VALUES) for t in GOOD_TEMPLATES]
    queries += [render(HOSTILE_TEMPLATE, _values(h)) for h in HOSTILE]
    result = _check_rules(promtool, queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    # and promtool does reject a naively substituted value, so the check can fail
    naive = HOSTILE_TEMPLATE.replace("{{namespace}}", 'a"b')
    naive = naive.replace("{{window}}", "1m").replace("{{interval}}", "30s")
    assert _check_rules(promtool, [naive], tmp_path).returncode != 0


# --- diagnostics ------------------------------------------------------------------------


def _diagnostics(source: str) -> str:
    tree, syntax = parse(source)
    assert tree is not None and syntax == [], syntax
    return "\n".join(
        render_diagnostic(d, source, "m.rules")
        for s in tree.statements
        if isinstance(s, MetricDef)
        for d in check_template(s)
    )


@pytest.mark.parametrize("template", GOOD_TEMPLATES)
def test_good_templates_have_no_diagnostics(template: str) -> None:
    assert _diagnostics(f"metric m = promql `{template}` as number\n") == ""


def test_unknown_placeholder_names_the_closest() -> None:
    assert _diagnostics('metric m = promql `up{ns="{{namspace}}"}` as count\n') == (
        "m.rules:1:27: error[E401]: unknown placeholder `{{namspace}}`\n"
        '   1 | metric m = promql `up{ns="{{namspace}}"}` as count\n'
        "     |                           ^^^^^^^^^^^^ not a placeholder\n"
        "     = help: did you mean `{{namespace}}`?"
    )


def test_unknown_placeholder_far_from_any_lists_them() -> None:
    text = _diagnostics('metric m = promql `up{ns="{{ zzzzzzzz }}"}` as count\n')
    assert "                           ^^^^^^^^^^^^^^ not a placeholder" in text
    assert "= help: placeholders are " + ", ".join(PLACEHOLDERS) in text


def test_spans_follow_a_template_over_several_lines() -> None:
    source = 'p99 > 1s -> rollback\nmetric m = promql `sum(up{\n  a="{{wrkload}}"})` as count\n'
    assert _diagnostics(source).splitlines()[:3] == [
        "m.rules:3:6: error[E401]: unknown placeholder `{{wrkload}}`",
        '   3 |   a="{{wrkload}}"})` as count',
        "     |      ^^^^^^^^^^^ not a placeholder",
    ]


@pytest.mark.parametrize(
    ("template", "caret", "message"),
    [
        ("sum(up) > {{workload}}", "          ^^^^^^^^^^^^", "outside a quoted label value"),
        ("up{a='{{workload}}'}", "      ^^^^^^^^^^^^", "single-quoted string"),
        ('up{a="{{window}}"}', "      ^^^^^^^^^^", "must stand where a duration goes"),
        ("rate(up[{{window}}s])", "        ^^^^^^^^^^", "must stand where a duration goes"),
        ("up offset{{window}}", "         ^^^^^^^^^^", "must stand where a duration goes"),
        ("up offset {{window}}s", "          ^^^^^^^^^^", "must stand where a duration goes"),
        ("rate(up[{{namespace}}])", "        ^^^^^^^^^^^^^", "outside a quoted label value"),
        ('up{pod="{{pod_regex}}"}', "        ^^^^^^^^^^^^^", "regular expression outside"),
    ],
)
def test_a_placeholder_in_the_wrong_place(template: str, caret: str, message: str) -> None:
    text = _diagnostics(f"metric m = promql `{template}` as count\n")
    lines = text.splitlines()
    assert "error[E402]" in lines[0] and message in lines[0]
    assert lines[2].startswith("     |" + " " * 20 + caret + " ")  # 20: `metric m = promql ``


def test_durations_stand_in_ranges_subqueries_and_offsets() -> None:
    for template in (
        "rate(up[{{window}}])",
        "rate(up[ {{window}} ])",
        "max_over_time(up[{{window}}:{{interval}}])",
        "up offset {{window}}",
        "up OFFSET -{{interval}}",
    ):
        assert _diagnostics(f"metric m = promql `{template}` as count\n") == "", template


def test_unknown_unit_names_the_closest() -> None:
    assert _diagnostics("metric m = promql `up` as duraton\n") == (
        "m.rules:1:27: error[E403]: unknown unit `duraton`\n"
        "   1 | metric m = promql `up` as duraton\n"
        "     |                           ^^^^^^^ unknown unit `duraton`\n"
        "     = help: did you mean `duration`?"
    )
    assert "help: units are duration, ratio, count, per_second" in _diagnostics(
        "metric m = promql `up` as zzzzzzz\n"
    )


@pytest.mark.parametrize(
    ("template", "caret", "message"),
    [
        ("", "^^", "the query is empty"),
        ("  # only a comment", "^^^^^^^^^^^^^^^^^^^^", "the query is empty"),
        ('up{a="b}', "     ^", "the string is never closed"),
        ("up{a='b}", "     ^", "the string is never closed"),
        ('up{a="b\n"}', "     ^", "the string is not closed on its line"),
        ("sum(rate(up[5m])", "   ^", "`(` is never closed"),
        ("sum(up))", "       ^", "`)` closes nothing"),
        ("sum(up[5m)]", "         ^", "`)` where `[` needs closing"),
        ('up{a="\\q"}', "      ^^", "unknown escape sequence"),
        ('up{a="\\x4"}', "      ^^^^", "malformed escape sequence"),
        ('up{a="\\ud800"}', "      ^^^^^^", "not a valid character"),
        ('up{a="\\{{workload}}"}', "      ^", "a backslash right before a placeholder"),
        ('up{a="{{workload"}', "      ^^", "`{{` is not closed by `}}`"),
    ],
)
def test_a_malformed_query(template: str, caret: str, message: str) -> None:
    text = _diagnostics(f"metric m = promql `{template}` as count\n")
    lines = text.splitlines()
    assert "error[E405]" in lines[0] and message in lines[0], text
    # the caret sits on the offending character; -1 for the empty query's backtick
    pad = 19 if message == "the query is empty" else 20
    assert lines[2].startswith("     |" + " " * pad + caret + " "), text


def test_a_valid_escape_in_the_template_is_kept() -> None:
    template = 'up{a="\\"q\\" \\\\ \\n \\x41 \\101 \\u2603 \\U0001F600", b=\'it\\\'s\'}'
    assert _diagnostics(f"metric m = promql `{template}` as count\n") == ""
    assert render(template, VALUES) == template


def test_several_problems_are_all_reported() -> None:
    text = _diagnostics('metric m = promql `up{a="{{wrkload}}"} > {{track}}` as zzzzzzz\n')
    assert [line.split("[")[1][:4] for line in text.splitlines() if "error[" in line] == [
        "E401",
        "E402",
        "E403",
    ]
