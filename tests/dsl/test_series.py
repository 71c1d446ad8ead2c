"""dsl.series: promtool's `values` notation and the value of a series at a time."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.series import MAX_SAMPLES, SeriesError, parse_series, value_at

# ---------------------------------------------------------------- every form


@pytest.mark.parametrize(
    ("text", "samples"),
    [
        ("3", [3.0]),
        ("-0.5", [-0.5]),
        ("+2", [2.0]),
        (".5 5.", [0.5, 5.0]),
        ("1e3 2.5E-1 -1e+2", [1000.0, 0.25, -100.0]),
        ("0.1x3", [0.1, 0.1, 0.1, 0.1]),
        ("7x0", [7.0]),
        ("1+2x3", [1.0, 3.0, 5.0, 7.0]),
        ("10-1x2", [10.0, 9.0, 8.0]),
        ("-1+1x2", [-1.0, 0.0, 1.0]),
        ("1e-3+1e-3x2", [0.001, 0.002, 0.003]),
        ("_", [None]),
        ("stale", [None]),
        ("_x2", [None, None, None]),
        ("1 _ stale 2", [1.0, None, None, 2.0]),
        ("0.1x3 0.5x10", [0.1] * 4 + [0.5] * 11),
        ("  1\t2\n3  ", [1.0, 2.0, 3.0]),
        ("", []),
    ],
)
def test_each_form(text: str, samples: list[float | None]) -> None:
    assert parse_series(text) == samples


def test_steps_are_exact_decimals() -> None:
    # Float addition would give 0.30000000000000004 for the third sample.
    assert parse_series("0.1+0.1x2") == [0.1, 0.2, 0.3]
    assert parse_series("0.3-0.1x3") == [0.3, 0.2, 0.1, 0.0]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("abc", 1, "is not a sample"),
        ("1 2 x3", 5, "is not a sample"),
        ("0.5 1+1", 5, "needs a count"),
        ("1x", 1, "needs a count after `x`"),
        ("_x", 1, "needs a count after `x`"),
        ("1 1X3", 3, "lowercase `x`"),
        ("300ms", 1, "plain numbers in base units"),
        ("50%", 1, "plain numbers in base units"),
        ("stalex2", 1, "is not a sample"),
        ("_+1x2", 1, "is not a sample"),
        ("1--1x2", 1, "is not a sample"),
        ("1e400", 1, "too large"),
        ("1e999999+1e999999x2", 1, "too large"),
        ("1 1x99999999999", 3, f"more than {MAX_SAMPLES} samples"),
    ],
)
def test_errors_name_the_token_and_its_column(text: str, column: int, words: str) -> None:
    with pytest.raises(SeriesError) as caught:
        parse_series(text)
    assert caught.value.column == column
    assert words in caught.value.message
    token = text[column - 1 :].split()[0]
    assert f"`{token}" in caught.value.message


def test_unknown_token_message_lists_what_is_allowed() -> None:
    with pytest.raises(SeriesError) as caught:
        parse_series("0.1x3 nope")
    message = str(caught.value)
    assert message.startswith("column 7: `nope`")
    for form in ("0.5x4", "1+2x3", "`_`", "`stale`", "`_x3`"):
        assert form in message


def test_total_length_is_bounded() -> None:
    half = f"1x{MAX_SAMPLES // 2}"
    with pytest.raises(SeriesError, match="longer than"):
        parse_series(f"{half} {half} {half}")


# ---------------------------------------------------------------- properties

_decimals = st.decimals(
    min_value=Decimal(-1000), max_value=Decimal(1000), places=3, allow_nan=False
)


@settings(max_examples=200)
@given(start=_decimals, step=_decimals.map(abs), n=st.integers(0, 30), up=st.booleans())
def test_step_series_match_decimal_arithmetic(
    start: Decimal, step: Decimal, n: int, up: bool
) -> None:
    sign = "+" if up else "-"
    samples = parse_series(f"{start}{sign}{step}x{n}")
    delta = step if up else -step
    assert samples == [float(start + i * delta) for i in range(n + 1)]


@settings(max_examples=200)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.floats(allow_nan=False, allow_infinity=False, width=64),
        ),
        max_size=30,
    )
)
def test_written_samples_read_back(samples: list[float | None]) -> None:
    text = " ".join("_" if s is None else repr(s) for s in samples)
    assert parse_series(text) == samples


# ---------------------------------------------------------------- value_at


def test_value_at_holds_each_sample_until_the_next() -> None:
    samples = [1.0, 2.0, 3.0]
    assert value_at(samples, 30, 0) == 1.0
    assert value_at(samples, 30, 29.9) == 1.0
    assert value_at(samples, 30, 30) == 2.0
    assert value_at(samples, 30, 75) == 3.0


def test_value_at_before_the_first_sample_is_unknown() -> None:
    assert value_at([1.0], 30, -1) is None
    assert value_at([], 30, 0) is None


def test_value_at_after_the_last_sample_keeps_it() -> None:
    assert value_at([1.0, 2.0], 30, 3600) == 2.0
    assert value_at([1.0, None], 30, 3600) is None


def test_value_at_a_gap_is_unknown_until_the_next_sample() -> None:
    samples = parse_series("1 _ stale 4")
    assert [value_at(samples, 10, t) for t in (0, 10, 15, 20, 29, 30)] == [
        1.0,
        None,
        None,
        None,
        None,
        4.0,
    ]


def test_value_at_is_not_fooled_by_float_rounding() -> None:
    # 0.3 / 0.1 is 2.9999999999999996 in floats; the sample at 0.3 is index 3.
    assert value_at([0.0, 1.0, 2.0, 3.0], 0.1, 0.3) == 3.0
    assert value_at([0.0, 1.0, 2.0, 3.0], 0.1, 3 * 0.1) == 3.0


def test_value_at_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        value_at([1.0], 0, 0)


@settings(max_examples=200)
@given(
    samples=st.lists(st.one_of(st.none(), st.integers(-5, 5).map(float)), min_size=1, max_size=20),
    interval=st.sampled_from([0.1, 1.0, 15.0, 30.0, 60.0]),
    k=st.integers(0, 40),
    offset=st.floats(0, 0.999),
)
def test_value_at_is_the_newest_sample_at_or_before_t(
    samples: list[float | None], interval: float, k: int, offset: float
) -> None:
    t = (k + offset) * interval
    newest = max(i for i in range(len(samples)) if i * interval <= t + 1e-9 * interval)
    assert value_at(samples, interval, t) == samples[min(newest, len(samples) - 1)]
