"""Suite-wide pytest setup: makes `tests.*` helpers importable and offers the real cluster.

`tests/` is a package, so pytest already puts the repository root on sys.path;
the explicit insert keeps `from tests.services import ...` working under
pytest's importlib import mode too. The fixtures of `tests/cluster/fixtures.py`
(a real control plane per session, a namespace per test) are available to
every test.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = ["tests.cluster.fixtures"]
