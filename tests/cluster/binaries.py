"""The control plane's programs: found in the build cache, or built from Go modules.

In: this folder's `go.mod`/`go.sum` (one pinned Kubernetes release and the
etcd it requires) and a Go toolchain. Out: a directory holding `etcd`,
`kube-apiserver`, `kube-controller-manager` and `kubectl`.

The cache lives in `$CODEDANCE_CLUSTER_CACHE` (default
`~/.cache/codedance/cluster`), one folder per hash of the module files and
the build flags, so a changed pin builds anew and an unchanged one never
builds twice. A build
writes into a temporary folder and renames it into place only when every
program is there, so an interrupted build leaves nothing half made.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_FILES = ("go.mod", "go.sum", "tools.go", "etcd/main.go")
PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
PACKAGES = (
    "./etcd",
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
    "k8s.io/kubernetes/cmd/kubectl",
)
INSTALL_HINT = (
    "the Kubernetes tests need Go to build the control plane once "
    "(apt-get install golang-go, or Go 1.26+ from go.dev), then: scripts/bootstrap"
)


class BuildError(Exception):
    """The programs could not be built; the message has the command and its output."""


def cache_root() -> Path:
    configured = os.environ.get("CODEDANCE_CLUSTER_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "codedance" / "cluster"


def cache_key() -> str:
    digest = hashlib.sha256()
    for name in MODULE_FILES:
        digest.update(name.encode())
        digest.update((HERE / name).read_bytes())
    # how they are built is part of what was built
    digest.update(" ".join(PACKAGES).encode())
    digest.update(version_flags().encode())
    return digest.hexdigest()[:16]


def bin_dir() -> Path:
    return cache_root() / cache_key() / "bin"


def built() -> Path | None:
    """The folder with every program, or None when they still need building."""
    directory = bin_dir()
    if all((directory / program).is_file() for program in PROGRAMS):
        return directory
    return None


def find_go() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    for candidate in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def kubernetes_version() -> str:
    """The pinned release, e.g. v1.36.3, as go.mod requires it."""
    for line in (HERE / "go.mod").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "k8s.io/kubernetes":
            return words[1]
    raise BuildError("go.mod does not require k8s.io/kubernetes")


def version_flags() -> str:
    """Linker flags that stamp the release into the programs, as Kubernetes' own build does.

    Without them `/version` says v0.0.0-master and kubectl warns about skew.
    """
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={version}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return " ".join(flags)


def build(*, progress: bool = True) -> Path:
    """Build the programs into the cache (a no-op when they are there); their folder."""
    ready = built()
    if ready is not None:
        return ready
    go = find_go()
    if go is None:
        raise BuildError(f"no Go toolchain found: {INSTALL_HINT}")
    target = bin_dir()
    staging = target.parent / f"bin.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    command = [go, "build", f"-ldflags={version_flags()}", "-o", str(staging) + "/", *PACKAGES]
    if progress:
        print(
            "cluster: building etcd, kube-apiserver, kube-controller-manager and kubectl "
            "from Go modules (once: about 6 minutes on 2 cores, plus the module downloads)",
            file=sys.stderr,
            flush=True,
        )
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    downloads = 0
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        if line.startswith("go: downloading"):
            downloads += 1
            if progress and downloads % 25 == 1:
                print(f"cluster: downloading Go modules ({downloads} so far)", file=sys.stderr)
    if progress and downloads:
        print(f"cluster: {downloads} Go modules downloaded; compiled", file=sys.stderr)
    if process.wait() != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "".join(output[-40:])
        raise BuildError(f"{' '.join(command)} failed in {HERE}:\n{tail}")
    missing = [program for program in PROGRAMS if not (staging / program).is_file()]
    if missing:
        raise BuildError(f"the build did not produce {', '.join(missing)}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    if progress:
        minutes = (time.monotonic() - started) / 60
        print(f"cluster: built into {target} in {minutes:.1f} min", file=sys.stderr, flush=True)
    return target


if __name__ == "__main__":
    try:
        print(build())
    except BuildError as error:
        print(f"cluster: error: {error}", file=sys.stderr)
        sys.exit(1)
