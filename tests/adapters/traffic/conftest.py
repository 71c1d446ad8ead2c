"""The traffic routers' tests run on the real control plane (tests/cluster/fixtures.py).

No test here needs the API double of tests/kube: the real server gives the
409 of a stale write (a test writes between the router's read and its write),
the 403 of a missing grant and the 422 of an invalid object on demand.
"""
