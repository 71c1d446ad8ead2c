"""Suite-wide pytest setup: only makes `tests.*` helpers importable.

`tests/` is a package, so pytest already puts the repository root on sys.path;
the explicit insert keeps `from tests.services import ...` working under
pytest's importlib import mode too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
