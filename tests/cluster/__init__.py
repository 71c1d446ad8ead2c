"""A real Kubernetes control plane on loopback, for the tests and for `scripts/cluster`.

etcd, kube-apiserver and kube-controller-manager are built from their Go
modules (this folder's go.mod pins one Kubernetes release) into a cache keyed
by go.sum; `fakelet` plays the nodes. `binaries` finds or builds the
programs, `pki` makes the keys, `controlplane` starts and stops the
processes, `fixtures` hands pytest a namespace per test.
"""
