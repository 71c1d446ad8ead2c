"""codedance.cli: `check`, `test` and `fmt`, their output and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codedance.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
CLEAN = "latency: p99 > 300ms for 2m -> rollback\n"
UNITS_WRONG = "latency: p99 > 5% for 2m -> rollback\n"
UNFORMATTED = "latency:p99>300ms   for 2m->rollback\n"

Capture = pytest.CaptureFixture[str]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the LANGUAGE.md policy and its section 8 test, safe to edit."""
    for name in ("checkout.rules", "checkout_test.yaml"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    return tmp_path


# ---------------------------------------------------------------- check


def test_check_clean_file(tmp_path: Path, capsys: Capture) -> None:
    path = write(tmp_path / "a.rules", CLEAN)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == "1 file checked, no problems"


def test_check_reports_diagnostics_in_the_fixed_format(tmp_path: Path, capsys: Capture) -> None:
    write(tmp_path / "a.rules", CLEAN)
    write(tmp_path / "b.rules", UNITS_WRONG + "p99 > 300ms -> rollbak\n")
    write(tmp_path / "c.rules", CLEAN)
    assert main(["check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    bad = tmp_path / "b.rules"
    assert out.startswith(
        f"{bad}:1:16: error[E201]: a percentage cannot be compared with a duration"
    )
    assert "   1 | latency: p99 > 5% for 2m -> rollback\n     |                ^^" in out
    assert f"{bad}:2:16: error[E103]" in out
    assert "did you mean `rollback`?" in out
    assert err.strip() == "2 errors in 1 of 3 files"


def test_check_keeps_the_path_as_given(
    tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "rules" / "team" / "a.rules", UNITS_WRONG)
    monkeypatch.chdir(tmp_path)
    assert main(["check", "rules/"]) == 1
    assert capsys.readouterr().out.startswith("rules/team/a.rules:1:16: error[E201]")


def test_check_walks_directories_sorted_and_skips_hidden_ones(
    tmp_path: Path, capsys: Capture
) -> None:
    for name in ("b.rules", "a/z.rules", "a.rules", "..data/b.rules", ".git/x.rules"):
        write(tmp_path / name, UNITS_WRONG)
    write(tmp_path / "notes.txt", UNITS_WRONG)
    assert main(["check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    headers = [line.split(":")[0] for line in out.splitlines() if "error[" in line]
    # Sorted by path components: the directory `a` comes before the file `a.rules`.
    assert headers == [str(tmp_path / n) for n in ("a/z.rules", "a.rules", "b.rules")]
    assert err.strip() == "3 errors in 3 of 3 files"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "name at least one"),
        (["missing.rules"], "missing.rules: no such file or directory"),
        (["notes.txt"], "notes.txt: not a `.rules` file or a directory"),
        (["empty"], "empty: no *.rules files in this directory"),
        (["latin1.rules"], "latin1.rules: cannot read: not UTF-8 text"),
    ],
)
def test_check_usage_errors(
    tmp_path: Path,
    capsys: Capture,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    words: str,
) -> None:
    write(tmp_path / "notes.txt", CLEAN)
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.rules").write_bytes("# caf\xe9\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    assert main(["check", *args]) == 2
    out, err = capsys.readouterr()
    assert words in err
    assert "Traceback" not in out + err


def test_unknown_option_and_no_command_are_usage_errors(capsys: Capture) -> None:
    assert main(["check", "--frobnicate"]) == 2
    assert main([]) == 2
    assert "usage: codedance" in capsys.readouterr().err
    assert main(["--help"]) == 0


# ---------------------------------------------------------------- test


def test_test_passes_the_language_example(checkout: Path, capsys: Capture) -> None:
    assert main(["test", str(checkout)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        str(checkout / "checkout_test.yaml"),
        "  PASS slow canary is rolled back",
        "1 passed, 0 failed",
    ]


def test_a_wrong_expectation_fails_with_expected_got_and_trace(
    checkout: Path, capsys: Capture
) -> None:
    test_file = checkout / "checkout_test.yaml"
    test_file.write_text(test_file.read_text().replace("at: 4m ", "at: 3m30s "))
    assert main(["test", str(test_file)]) == 1
    out = capsys.readouterr().out
    assert "  FAIL slow canary is rolled back\n" in out
    assert "    at 3m30s: expected rollback (rule latency), got continue\n" in out
    assert "      continue: no rule fires\n" in out
    assert "        latency -> rollback: condition true, pending" in out
    assert "        early_win -> promote: condition false, inactive" in out
    assert out.endswith("0 passed, 1 failed\n")


def test_unparsable_yaml_exits_2_with_file_and_line(tmp_path: Path, capsys: Capture) -> None:
    path = write(tmp_path / "broken_test.yaml", "rule_files: [a.rules\ntests: {\n")
    assert main(["test", str(path)]) == 2
    out = capsys.readouterr().out
    assert f"ERROR {path}:2:6: invalid YAML:" in out
    assert out.endswith("0 passed, 0 failed, 1 error\n")


def test_a_key_written_twice_is_a_yaml_error(checkout: Path, capsys: Capture) -> None:
    test_file = checkout / "checkout_test.yaml"
    test_file.write_text(test_file.read_text() + "evaluation_interval: 1m\n")
    assert main(["test", str(test_file)]) == 2
    assert "the key `evaluation_interval` is written twice" in capsys.readouterr().out


def test_a_rule_file_with_errors_exits_2_with_its_diagnostics(
    checkout: Path, capsys: Capture
) -> None:
    write(checkout / "checkout.rules", UNITS_WRONG)
    assert main(["test", str(checkout)]) == 2
    out = capsys.readouterr().out
    assert f"{checkout / 'checkout.rules'}:1:16: error[E201]" in out
    assert "= help: write a duration such as 300ms" in out


def test_a_problem_points_at_its_line_in_the_test_file(checkout: Path, capsys: Capture) -> None:
    test_file = checkout / "checkout_test.yaml"
    test_file.write_text(test_file.read_text().replace("series: stable.p99", "series: stable.p98"))
    assert main(["test", str(test_file)]) == 2
    out = capsys.readouterr().out
    assert "  ERROR slow canary is rolled back\n" in out
    assert f"{test_file}:10:17: tests[0].input_series[1].series: the policy does not read" in out
    assert "did you mean `stable.p99`?" in out


def test_test_finds_test_files_recursively(checkout: Path, capsys: Capture) -> None:
    nested = checkout / "more" / "again_test.yaml"
    nested.parent.mkdir()
    nested.write_text(
        (checkout / "checkout_test.yaml")
        .read_text()
        .replace("[checkout.rules]", "[../checkout.rules]")
        .replace("at: 4m ", "at: 1m ")
    )
    write(checkout / "more" / "ignored.yaml", "not: a test")
    assert main(["test", str(checkout)]) == 1
    out = capsys.readouterr().out
    assert out.index("checkout_test.yaml") < out.index("again_test.yaml")
    assert "ignored" not in out
    assert out.endswith("1 passed, 1 failed\n")


def test_test_usage_errors(tmp_path: Path, capsys: Capture) -> None:
    assert main(["test"]) == 2
    assert main(["test", str(tmp_path)]) == 2
    assert main(["test", str(write(tmp_path / "a.rules", CLEAN))]) == 2
    err = capsys.readouterr().err
    assert "no *_test.yaml files" in err
    assert "not a YAML test file" in err


# ---------------------------------------------------------------- fmt


def test_fmt_check_lists_an_unformatted_file_and_leaves_it(tmp_path: Path, capsys: Capture) -> None:
    path = write(tmp_path / "a.rules", UNFORMATTED)
    write(tmp_path / "b.rules", CLEAN)
    assert main(["fmt", "--check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"would reformat {path}\n"
    assert "1 file would be reformatted, 1 already formatted" in err
    assert path.read_text() == UNFORMATTED


def test_fmt_rewrites_in_place_and_then_is_clean(tmp_path: Path, capsys: Capture) -> None:
    path = write(tmp_path / "a.rules", UNFORMATTED)
    path.chmod(0o640)
    assert main(["fmt", str(path)]) == 0
    assert path.read_text() == CLEAN
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rules"]  # no temporary left
    assert main(["fmt", "--check", str(path)]) == 0
    assert "reformatted" in capsys.readouterr().out


def test_fmt_normalises_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "a.rules"
    path.write_bytes(CLEAN.replace("\n", "\r\n").encode())
    assert main(["fmt", "--check", str(path)]) == 1
    assert main(["fmt", str(path)]) == 0
    assert path.read_bytes() == CLEAN.encode()


def test_fmt_never_rewrites_a_file_with_syntax_errors(tmp_path: Path, capsys: Capture) -> None:
    broken = "latency:p99 >   -> rollback\n"
    path = write(tmp_path / "a.rules", broken)
    assert main(["fmt", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}:1:" in out
    assert "error[E001]" in out
    assert "1 with syntax errors (left unchanged)" in err
    assert path.read_text() == broken


def test_fmt_usage_error(tmp_path: Path, capsys: Capture) -> None:
    assert main(["fmt", str(tmp_path / "nope.rules")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ---------------------------------------------------------------- the installed command


def test_the_installed_command_runs_the_example() -> None:
    command = Path(sys.executable).parent / "codedance"
    done = subprocess.run(
        [str(command), "test", str(FIXTURES / "checkout_test.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS slow canary is rolled back" in done.stdout
    assert done.stdout.endswith("1 passed, 0 failed\n")
    assert done.stderr == ""
