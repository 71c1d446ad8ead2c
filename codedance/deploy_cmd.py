"""`codedance crd` and `codedance policies-configmap`: the generated files of deploy/.

    codedance crd                                        the CanaryDeployment CRD
    codedance policies-configmap [--namespace N] DIR     DIR/*.rules as a ConfigMap

Both print one YAML document on stdout, starting with a comment that says how
it was made; `deploy/crd.yaml` and `deploy/policies-configmap.yaml` are their
output, and a test keeps those files equal to what the commands print now.

`policies-configmap` reads the directory as the controller's policy store
does (`engine.policystore.read_policy_files`: visible `NAME.rules` files,
UTF-8, universal newlines) and loads every policy with `dsl.load`, so a
ConfigMap is never made from a policy the controller would refuse. Exit 0
when printed, 1 when a policy has errors (the diagnostics go to stderr and
nothing to stdout), 2 for a usage error (no such directory, no policies, a
file name that cannot be a ConfigMap key, more than a ConfigMap holds).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

from codedance.policy_files import UsageError

CONFIGMAP_NAME = "codedance-policies"
DEFAULT_NAMESPACE = "codedance"
LABELS = {"app.kubernetes.io/name": "codedance", "app.kubernetes.io/part-of": "codedance"}

# The API server refuses a ConfigMap whose data exceeds 1 MiB.
CONFIGMAP_LIMIT = 1024 * 1024
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

CRD_HEADER = (
    "# The CanaryDeployment CustomResourceDefinition, generated from adapters/kube/models.py.\n"
    "# Do not edit: change the models, then run `codedance crd > deploy/crd.yaml`.\n"
)


def add_commands(commands: Any) -> None:
    crd = commands.add_parser("crd", help="print the CanaryDeployment CRD as YAML")
    crd.set_defaults(run=_crd)

    configmap = commands.add_parser(
        "policies-configmap", help="print a directory's .rules files as a ConfigMap"
    )
    configmap.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, metavar="N",
        help=f"the controller's namespace (default {DEFAULT_NAMESPACE})",
    )
    configmap.add_argument("directory", metavar="DIR", help="a directory of .rules files")
    configmap.set_defaults(run=_policies_configmap)


class PolicyFilesError(Exception):
    """Policies that do not load; the message is their rendered diagnostics."""


# ---------------------------------------------------------------- YAML


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order given, multi-line text as `|` blocks, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # A policy reads as itself under `|`; PyYAML falls back to a quoted
    # scalar when the text cannot be a block (trailing spaces, tabs).
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def dump_yaml(obj: Any) -> str:
    """One YAML document, as the generated files of deploy/ are written."""
    text: str = yaml.dump(
        obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
        allow_unicode=True, width=100,
    )
    return text


# ---------------------------------------------------------------- the CRD


def crd_text() -> str:
    """The text of deploy/crd.yaml."""
    from adapters.kube.crd import crd_manifest

    return CRD_HEADER + dump_yaml(crd_manifest())


def _crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_text())
    return 0


# ---------------------------------------------------------------- the policy ConfigMap


def policies_configmap(directory: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """A ConfigMap holding every policy of `directory`, keyed `NAME.rules`.

    Raises `UsageError` for a directory that cannot be used, `PolicyFilesError`
    when a policy has errors.
    """
    import dsl
    from engine.policystore import SUFFIX, read_policy_files

    if not _NAMESPACE.match(namespace) or len(namespace) > 63:
        raise UsageError(f"{namespace!r} is not a namespace name (a DNS-1123 label)")
    sources, problems = read_policy_files(directory)
    for problem in problems:
        if problem.name is None:  # the directory itself
            raise UsageError(problem.message)
    if not sources and not problems:
        raise UsageError(f"{directory}: no {SUFFIX} files in this directory")
    messages = [problem.message for problem in problems]
    data: dict[str, str] = {}
    for name, (path, text) in sorted(sources.items()):
        key = name + SUFFIX
        if not _KEY.match(key) or len(key) > 253:
            raise UsageError(f"{path}: {key!r} cannot be a ConfigMap key (letters, digits, -._)")
        try:
            dsl.load(text, path)
        except dsl.PolicyError as e:
            messages.append(e.render())
        data[key] = text
    if messages:
        raise PolicyFilesError("\n\n".join(messages))
    size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    if size > CONFIGMAP_LIMIT:
        raise UsageError(
            f"{directory}: the policies take {size} bytes; a ConfigMap holds at most "
            f"{CONFIGMAP_LIMIT}"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace, "labels": dict(LABELS)},
        "data": data,
    }


def policies_configmap_text(directory: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The ConfigMap as YAML, after a comment naming the command that makes it."""
    configmap = policies_configmap(directory, namespace)
    header = (
        f"# The policies of {directory}, for the controller's policy directory.\n"
        f"# Do not edit: change the .rules files, then run\n"
        f"# `codedance policies-configmap --namespace {namespace} {directory}`.\n"
    )
    return header + dump_yaml(configmap)


def _policies_configmap(args: argparse.Namespace) -> int:
    try:
        text = policies_configmap_text(args.directory, args.namespace)
    except PolicyFilesError as e:
        print(e, file=sys.stderr)
        print(f"no ConfigMap printed: {args.directory} has policies with errors", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0
