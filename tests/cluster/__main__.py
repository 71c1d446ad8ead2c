"""`scripts/cluster up|down|env|status`: a local control plane for people.

`up` builds the programs if needed (once), starts etcd, kube-apiserver,
kube-controller-manager and the fake nodes on loopback ports with state in
`.cluster/`, and prints the kubeconfig paths; `env` prints the shell line
that points kubectl and codedance at it; `status` says which processes run;
`down` stops them by PID and removes the state. A second `up` while one runs
says so and changes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from tests.cluster import binaries
from tests.cluster.controlplane import (
    IDENTITIES,
    ROOT,
    ClusterError,
    ControlPlane,
    pid_alive,
)

STATE = ROOT / ".cluster"


def say(text: str) -> None:
    print(f"cluster: {text}", file=sys.stderr, flush=True)


def running() -> ControlPlane | None:
    plane = ControlPlane.load(STATE)
    if plane is None or not any(pid_alive(pid) for pid in plane.pids.values()):
        return None
    return plane


def up(arguments: argparse.Namespace) -> int:
    plane = running()
    if plane is not None:
        if all(plane.alive().values()):
            say(f"already running at {plane.server}")
            print(plane.kubeconfig("admin"))
            return 0
        dead = ", ".join(name for name, alive in plane.alive().items() if not alive)
        say(f"the running control plane lost {dead}; starting it afresh")
        plane.stop()
    try:
        bin_dir = binaries.build()
    except binaries.BuildError as error:
        say(f"error: {error}")
        return 1
    shutil.rmtree(STATE, ignore_errors=True)
    plane = ControlPlane(
        directory=STATE, bin_dir=bin_dir, nodes=arguments.nodes, ready_after=arguments.ready_after
    )
    say("starting etcd, kube-apiserver, kube-controller-manager and fake nodes")
    try:
        plane.start()
    except ClusterError as error:
        say(f"error: {error}")
        return 1
    say(f"ready at {plane.server} ({plane.nodes} fake nodes; logs in {STATE / 'logs'})")
    for identity in ("alice", "bob", "controller"):
        say(f"kubeconfig as {IDENTITIES[identity][0]}: {plane.kubeconfig(identity)}")
    say(f"kubectl: {plane.bin_dir / 'kubectl'}")
    say('next: eval "$(scripts/cluster env)"; kubectl get nodes')
    print(plane.kubeconfig("admin"))
    return 0


def down(arguments: argparse.Namespace) -> int:
    plane = ControlPlane.load(STATE)
    if plane is None:
        say("nothing running")
        return 0
    plane.stop()
    left = [name for name, pid in plane.pids.items() if pid_alive(pid)]
    if left:
        say(f"error: still running: {', '.join(left)}")
        return 1
    shutil.rmtree(STATE, ignore_errors=True)
    say("stopped")
    return 0


def env(arguments: argparse.Namespace) -> int:
    plane = running()
    if plane is None:
        say("not running; start it with: scripts/cluster up")
        return 1
    print(f"export KUBECONFIG={plane.kubeconfig(arguments.user)}")
    print(f"export PATH={plane.bin_dir}:$PATH")
    return 0


def status(arguments: argparse.Namespace) -> int:
    plane = ControlPlane.load(STATE)
    if plane is None:
        print("not running")
        return 1
    for name, pid in plane.pids.items():
        print(f"{name:<26} pid {pid:<8} {'running' if pid_alive(pid) else 'exited'}")
    print(f"server {plane.server}")
    return 0 if all(pid_alive(pid) for pid in plane.pids.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description="A real Kubernetes control plane on this machine, with fake nodes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="build if needed, start, print the admin kubeconfig")
    start.add_argument("--nodes", type=int, default=2, help="fake nodes (default 2)")
    start.add_argument(
        "--ready-after", type=float, default=1.0, help="seconds before a pod is ready (default 1)"
    )
    start.set_defaults(run=up)
    commands.add_parser("down", help="stop every process and remove .cluster/").set_defaults(
        run=down
    )
    shell = commands.add_parser("env", help="print the shell exports for kubectl and codedance")
    shell.add_argument(
        "--user",
        default="admin",
        choices=sorted(set(IDENTITIES) - {"kube-controller-manager", "fakelet"}),
        help="whose kubeconfig (default admin)",
    )
    shell.set_defaults(run=env)
    commands.add_parser("status", help="which processes run").set_defaults(run=status)
    arguments = parser.parse_args(argv)
    return int(arguments.run(arguments))


if __name__ == "__main__":
    sys.exit(main())
