"""The composition root: the `codedance` command and the wiring behind it.

`codedance.cli` parses the command line and runs a subcommand (`check`,
`test`, `fmt`); `codedance.policy_files` finds, reads and writes the files
they work on. The language lives in `dsl`, running policies over time in
`engine`; this package only connects them to files, terminals and exit codes.
"""
