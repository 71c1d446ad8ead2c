"""Start and stop a real Kubernetes control plane on loopback ports.

In: the folder of built programs (`binaries`), a state directory. Out: a
running `ControlPlane`: etcd, kube-apiserver (TLS with our own CA, static
token authentication, the Node and RBAC authorizers, an audit log of the
people and the controller), kube-controller-manager (Deployments,
ReplicaSets, EndpointSlices, garbage collection, namespaces, ServiceAccounts,
disruption budgets) and the fake nodes of `fakelet`, with a kubeconfig per
identity, Codedance's CRD and the vendored Istio and Gateway API CRDs
applied, and `deploy/`'s namespace and RBAC applied as shipped.

The identities (static tokens, fresh per control plane):

| name | user | what it may do |
|---|---|---|
| admin | `admin` (group system:masters) | everything: the tests' own setup |
| controller | `system:serviceaccount:codedance:codedance-controller` | exactly `deploy/rbac.yaml` |
| alice | `alice` | may release (the ClusterRole `codedance-releaser`) |
| bob | `bob` | may approve (the ClusterRole `codedance-approver`) |

Every process is started in a session of its own and stopped by its PID (the
PIDs are kept in `state.json`, so `scripts/cluster down` can stop a control
plane another process started). Nothing listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import pki

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CRDS = (
    ROOT / "deploy" / "crd.yaml",
    ROOT / "tests" / "schemas" / "istio" / "virtualservices.networking.istio.io.yaml",
    ROOT / "tests" / "schemas" / "istio" / "destinationrules.networking.istio.io.yaml",
    ROOT / "tests" / "schemas" / "gateway-api" / "gateway.networking.k8s.io_httproutes.yaml",
)
SHIPPED = (ROOT / "deploy" / "namespace.yaml", ROOT / "deploy" / "rbac.yaml")
PEOPLE = HERE / "people.yaml"

CONTROLLER_NAMESPACE = "codedance"
CONTROLLER_ACCOUNT = "codedance-controller"
CONTROLLER_USER = f"system:serviceaccount:{CONTROLLER_NAMESPACE}:{CONTROLLER_ACCOUNT}"
IDENTITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "admin": ("admin", ("system:masters",)),
    "controller": (
        CONTROLLER_USER,
        ("system:serviceaccounts", f"system:serviceaccounts:{CONTROLLER_NAMESPACE}"),
    ),
    "alice": ("alice", ()),
    "bob": ("bob", ()),
    # the controller manager and the fake nodes act for the cluster itself
    "kube-controller-manager": ("system:kube-controller-manager", ("system:masters",)),
    "fakelet": ("system:codedance-fakelet", ("system:masters",)),
}
# Only the people and the controller are audited: what the RBAC test reads.
AUDITED = ("alice", "bob", "controller")
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "endpointslice-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "disruption-controller",
)
SERVICE_RANGE = "10.96.0.0/16"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


class ClusterError(Exception):
    """The control plane did not start; the message names the process and its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ControlPlane:
    """A control plane's state directory and, once started, its processes."""

    directory: Path
    bin_dir: Path
    nodes: int = 2
    ready_after: float = 0.0
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    # -- paths -----------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    @property
    def audit_log(self) -> Path:
        return self.directory / "audit.log"

    def kubeconfig(self, identity: str = "admin") -> Path:
        return self.directory / f"kubeconfig-{identity}"

    def log(self, process: str) -> Path:
        return self.directory / "logs" / f"{process}.log"

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start every process and wait until the cluster serves; stops all on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        keys = pki.create(self.directory / "pki")
        self.ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver")}
        self.tokens = {name: secrets.token_hex(24) for name in IDENTITIES}
        self._write_identity_files()
        self._spawn("etcd", self._etcd_command())
        self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", "etcd", ssl_ok=False)
        self._spawn("kube-apiserver", self._apiserver_command(keys))
        self._wait_http(f"{self.server}/readyz", "kube-apiserver")
        self._spawn("kube-controller-manager", self._controller_manager_command())
        self._spawn("fakelet", self._fakelet_command())
        self._save_state()
        self.kubectl("apply", "--server-side", *self._files(CRDS))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        # Established is not yet servable: the new resources answer 429
        # "storage is (re)initializing" for a moment after it
        self._wait_until(self._custom_resources_served, "the CRDs to be served", "kube-apiserver")
        self.kubectl("apply", "--server-side", *self._files((*SHIPPED, PEOPLE)))
        self._wait_until(self._nodes_ready, "the fake nodes to be Ready", "fakelet")
        self._wait_until(
            lambda: self._has_default_account("default"),
            "the default ServiceAccount (kube-controller-manager)",
            "kube-controller-manager",
        )
        for name, pid in self.pids.items():
            if not pid_alive(pid):
                raise ClusterError(f"{name} exited; see {self.log(name)}:\n{tail(self.log(name))}")

    def stop(self) -> None:
        """Stop every process by its PID (TERM, then KILL), newest first."""
        for name in reversed(list(self.pids)):
            stop_pid(self.pids[name])
        self.pids.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "state.json").unlink()

    def alive(self) -> dict[str, bool]:
        return {name: pid_alive(pid) for name, pid in self.pids.items()}

    # -- state shared with `scripts/cluster` -----------------------------------
    def _save_state(self) -> None:
        state = {
            "pids": self.pids,
            "ports": self.ports,
            "bin_dir": str(self.bin_dir),
            "server": self.server,
        }
        (self.directory / "state.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, directory: Path) -> ControlPlane | None:
        """The control plane whose state is in `directory`, or None if there is none."""
        try:
            state = json.loads((directory / "state.json").read_text())
        except FileNotFoundError:
            return None
        plane = cls(directory=directory, bin_dir=Path(state["bin_dir"]))
        plane.pids = {name: int(pid) for name, pid in state["pids"].items()}
        plane.ports = {name: int(port) for name, port in state["ports"].items()}
        return plane

    # -- commands --------------------------------------------------------------
    def _etcd_command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            str(self.bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # a throwaway cluster: durability costs seconds per test on a busy disk
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_command(self, keys: pki.Pki) -> list[str]:
        issuer = "https://kubernetes.default.svc.cluster.local"
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            "--advertise-address=127.0.0.1",
            # the `kubernetes` Service's endpoints would be 127.0.0.1, which
            # EndpointSlice validation refuses; nothing here needs them
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={keys.server_cert}",
            f"--tls-private-key-file={keys.server_key}",
            f"--token-auth-file={self.directory / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            # as OpenShift runs it: setting blockOwnerDeletion on an object owned
            # by a CanaryDeployment needs `update` on canarydeployments/finalizers
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            f"--service-account-issuer={issuer}",
            f"--api-audiences={issuer}",
            f"--service-account-key-file={keys.sa_pub}",
            f"--service-account-signing-key-file={keys.sa_key}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--allow-privileged=true",
            f"--audit-policy-file={self.directory / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-maxsize=0",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_command(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig('kube-controller-manager')}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            # the garbage collector and namespace deletion react within seconds
            "--concurrent-gc-syncs=5",
            "--namespace-sync-period=10s",
            "--v=1",
        ]

    def _fakelet_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.cluster.fakelet",
            f"--kubeconfig={self.kubeconfig('fakelet')}",
            f"--nodes={self.nodes}",
            f"--ready-after={self.ready_after}",
        ]

    def _spawn(self, name: str, command: list[str]) -> None:
        log = self.log(name).open("ab")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.pids[name] = process.pid

    def _write_identity_files(self) -> None:
        rows = []
        for name, (user, groups) in IDENTITIES.items():
            rows.append(f'{self.tokens[name]},{user},{user},"{",".join(groups)}"')
            self._write_kubeconfig(name)
        tokens = self.directory / "tokens.csv"
        tokens.write_text("\n".join(rows) + "\n")
        tokens.chmod(0o600)
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "Metadata", "users": [IDENTITIES[name][0] for name in AUDITED]},
                {"level": "None"},
            ],
        }
        (self.directory / "audit-policy.yaml").write_text(yaml.safe_dump(policy))

    def _write_kubeconfig(self, identity: str) -> None:
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "codedance-local",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": identity, "user": {"token": self.tokens[identity]}}],
            "contexts": [
                {
                    "name": identity,
                    "context": {"cluster": "codedance-local", "user": identity},
                }
            ],
            "current-context": identity,
        }
        path = self.kubeconfig(identity)
        path.write_text(yaml.safe_dump(document))
        path.chmod(0o600)

    # -- kubectl and readiness --------------------------------------------------
    def kubectl(self, *args: str, identity: str = "admin", input: str | None = None) -> str:
        command = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig(identity)}"]
        result = subprocess.run(
            [*command, *args], input=input, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def get_json(self, path: str) -> Any:
        request = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.tokens['admin']}"}
        )
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return json.loads(response.read())

    def _files(self, paths: tuple[Path, ...]) -> list[str]:
        return [f"--filename={path}" for path in paths]

    def _custom_resources_served(self) -> bool:
        for crd in self.get_json("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")[
            "items"
        ]:
            group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    try:
                        self.get_json(f"/apis/{group}/{version['name']}/{plural}?limit=1")
                    except urllib.error.HTTPError:
                        return False
        return True

    def _nodes_ready(self) -> bool:
        nodes = self.get_json("/api/v1/nodes")["items"]
        ready = [
            node
            for node in nodes
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node.get("status", {}).get("conditions", [])
            )
        ]
        return len(ready) >= self.nodes

    def _has_default_account(self, namespace: str) -> bool:
        try:
            self.get_json(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise
        return True

    def _wait_http(self, url: str, process: str, *, ssl_ok: bool = True) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file)) if ssl_ok else None
        headers = {"Authorization": f"Bearer {self.tokens['admin']}"} if ssl_ok else {}

        def answers() -> bool:
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    return bool(response.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        self._wait_until(answers, f"{process} to answer {url}", process)

    def _wait_until(self, check: Any, what: str, process: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            pid = self.pids.get(process)
            if pid is not None and not pid_alive(pid):
                raise ClusterError(
                    f"{process} exited; see {self.log(process)}:\n{tail(self.log(process))}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError, KeyError):
                if check():
                    return
            time.sleep(0.2)
        raise ClusterError(
            f"timed out after {START_TIMEOUT:.0f}s waiting for {what}; "
            f"see {self.log(process)}:\n{tail(self.log(process))}"
        )


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours has exited but not been reaped
    with contextlib.suppress(FileNotFoundError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """TERM the process group `pid` leads, KILL it after `timeout`, reap it if ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                return
            time.sleep(0.05)
