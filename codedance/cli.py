"""The `codedance` command: arguments in, text on stdout/stderr and an exit code out.

    codedance check PATH...          check .rules files (exit 0 clean, 1 diagnostics, 2 usage)
    codedance test FILE_OR_DIR...    run *_test.yaml policy tests (0 pass, 1 fail, 2 broken file)
    codedance fmt [--check] PATH...  rewrite .rules files in canonical form
    codedance explain FILE...        each rule in plain words (0, 1 diagnostics, 2 usage)
    codedance backtest POLICY (--recording FILE | --prometheus URL --rollout NS/NAME) ...
                                     replay past metrics through a policy (0 ran, 2 bad input)
    codedance repl [FILE...]         try a policy interactively
    codedance demo [--scenario ...]  a canary release on this machine (0 Succeeded, 1 not)
    codedance run ROLLOUT.yaml --local   the same, driven by a CanaryDeployment manifest
    codedance controller [...]       the controller, in a cluster (leader elected)
    codedance status [NAME] [-n NS | -A] [--watch]   CanaryDeployments, like kubectl get
    codedance approve|pause|resume|abort|retry NAME [-n NS] [--reason TEXT]
                                     manual control (0 done, 1 refused, 2 usage)
    codedance traffic NAME [-n NS] [--json]   where a rollout's requests go (0, 2 usage)
    codedance crd                    print the CanaryDeployment CRD (deploy/crd.yaml)
    codedance policies-configmap [--namespace N] DIR
                                     print DIR's .rules files as a ConfigMap (0, 1 errors, 2 usage)

Output is plain text that reads the same in a terminal and in a CI log.
Results go to stdout and summaries and usage errors to stderr, so `check`
output can be piped into another tool. Every failure is a one-line message
or a diagnostic in the format of LANGUAGE.md section 7, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from codedance.policy_files import (
    FileProblem,
    UsageError,
    YamlDocument,
    find_files,
    load_yaml,
    read_text,
    write_atomically,
)

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the return value is the process exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad usage (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as e:
        _flush()
        print(f"codedance {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`codedance test | head`). Point stdout at
        # /dev/null so the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PROBLEMS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codedance", description="Progressive delivery driven by a policy language."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check", help="check .rules files for errors")
    check.add_argument("paths", nargs="*", metavar="PATH", help=".rules file or directory")
    check.set_defaults(run=_check)

    test = commands.add_parser("test", help="run *_test.yaml policy tests")
    test.add_argument("paths", nargs="*", metavar="FILE_OR_DIR", help="test file or directory")
    test.set_defaults(run=_test)

    fmt = commands.add_parser("fmt", help="rewrite .rules files in canonical form")
    fmt.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file would change"
    )
    fmt.add_argument("paths", nargs="*", metavar="PATH", help=".rules file or directory")
    fmt.set_defaults(run=_fmt)

    from codedance.demo_cmd import add_commands

    add_commands(commands)
    from codedance.backtest import add_command as add_backtest

    add_backtest(commands)
    from codedance.explain_cmd import add_command as add_explain

    add_explain(commands)
    from codedance.repl import add_command as add_repl

    add_repl(commands)
    from codedance.deploy_cmd import add_commands as add_deploy

    add_deploy(commands)
    from codedance.controller_cmd import add_command as add_controller

    add_controller(commands)
    from codedance.control_cmd import add_commands as add_control

    add_control(commands)
    from codedance.traffic_cmd import add_command as add_traffic

    add_traffic(commands)
    return parser


def _is_rules(path: str) -> bool:
    return path.endswith(".rules")


def _is_yaml(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def _flush() -> None:
    # stdout is block-buffered when piped; flush it before writing to stderr so
    # that `2>&1` keeps messages in order.
    sys.stdout.flush()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- check


def _check(args: argparse.Namespace) -> int:
    from dsl import check_source
    from dsl.diagnostics import LineIndex, render

    files = find_files(args.paths, "*.rules", _is_rules, "`.rules` file")
    errors = warnings = with_problems = unreadable = 0
    for path in files:
        try:
            source = read_text(path)
        except FileProblem as e:
            _flush()
            print(e, file=sys.stderr)
            unreadable += 1
            continue
        diagnostics = check_source(source)
        if diagnostics:
            with_problems += 1
            index = LineIndex(source)
            for d in diagnostics:
                print(render(d, source, path, index), end="\n\n")
        errors += sum(d.severity == "error" for d in diagnostics)
        warnings += sum(d.severity != "error" for d in diagnostics)
    _flush()
    if unreadable:
        print(f"{_plural(unreadable, 'file')} could not be read", file=sys.stderr)
        return EXIT_USAGE
    if with_problems:
        found = _plural(errors, "error")
        if warnings:
            found += f", {_plural(warnings, 'warning')}"
        of = f"{with_problems} of {len(files)} files" if len(files) > 1 else "1 file"
        print(f"{found} in {of}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"{_plural(len(files), 'file')} checked, no problems", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- test


def _test(args: argparse.Namespace) -> int:
    from engine.policytest import run_test_file

    files = find_files(args.paths, "*_test.yaml", _is_yaml, "YAML test file")
    passed = failed = broken = 0
    for path in files:
        print(path)
        try:
            document = load_yaml(path)
        except FileProblem as e:
            print(f"  ERROR {e}")
            broken += 1
            continue
        result = run_test_file(path, document.data)
        for problem in result.problems:
            print(_indent(_where(document, problem.loc) + problem.describe(), 2, "ERROR "))
        if result.problems:
            broken += 1
        for case in result.cases:
            print(f"  {_LABELS[case.status]} {case.name}")
            for problem in case.problems:
                print(_indent(_where(document, problem.loc) + problem.describe(), 4))
            for failure in case.failures:
                print(_indent(failure.describe(), 4))
        passed += sum(c.status == "passed" for c in result.cases)
        failed += sum(c.status == "failed" for c in result.cases)
        broken += sum(c.status == "error" for c in result.cases)
    summary = f"{passed} passed, {failed} failed"
    if broken:
        summary += f", {_plural(broken, 'error')}"
    print(summary)
    if broken:
        return EXIT_USAGE
    return EXIT_PROBLEMS if failed else EXIT_OK


_LABELS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR"}


def _where(document: YamlDocument, loc: Sequence[str | int]) -> str:
    """`file:line:col: ` for a problem with a key path, so an editor can jump to it."""
    if not loc:
        return f"{document.path}: "
    position = document.position(loc)
    if position is None:
        return f"{document.path}: "
    return f"{document.path}:{position[0]}:{position[1]}: "


def _indent(text: str, width: int, first: str = "") -> str:
    """Indent a block; with a `first` label, the lines below it sit under the label's text."""
    pad = " " * width
    rest = pad + "  " if first else pad
    lines = text.splitlines() or [""]
    return "\n".join([pad + first + lines[0], *(rest + line for line in lines[1:])])


# ---------------------------------------------------------------- fmt


def _fmt(args: argparse.Namespace) -> int:
    from dsl.diagnostics import LineIndex, render
    from dsl.format import format_policy
    from dsl.parser import parse

    files = find_files(args.paths, "*.rules", _is_rules, "`.rules` file")
    changed = unchanged = broken = unreadable = 0
    for path in files:
        try:
            written = read_text(path, keep_newlines=True)
        except FileProblem as e:
            _flush()
            print(e, file=sys.stderr)
            unreadable += 1
            continue
        source = written.replace("\r\n", "\n")
        tree, diagnostics = parse(source)
        if tree is None or diagnostics:
            index = LineIndex(source)
            for d in diagnostics:
                print(render(d, source, path, index), end="\n\n")
            broken += 1
            continue
        formatted = format_policy(tree, source)
        if formatted == written:
            unchanged += 1
            continue
        changed += 1
        if args.check:
            print(f"would reformat {path}")
            continue
        try:
            write_atomically(path, formatted)
        except FileProblem as e:
            _flush()
            print(e, file=sys.stderr)
            unreadable += 1
            continue
        print(f"reformatted {path}")
    _flush()
    verb = "would be reformatted" if args.check else "reformatted"
    parts = [f"{_plural(changed, 'file')} {verb}", f"{unchanged} already formatted"]
    if broken:
        parts.append(f"{broken} with syntax errors (left unchanged)")
    print(", ".join(parts), file=sys.stderr)
    if unreadable:
        return EXIT_USAGE
    if broken or (args.check and changed):
        return EXIT_PROBLEMS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
