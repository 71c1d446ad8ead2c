"""Helper for adapter tests on the real control plane: a writer between a read and a write.

- `before_each(api, monkeypatch, method, path_suffix, action)`: runs `action`
  (an admin write, say) just before each request of `api` with that method
  whose path ends with `path_suffix`; it gets the request body and returns
  whether the request should still hook (False stops hooking). This makes a
  real concurrent writer at a chosen moment, so the server answers a real 409.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes.aio import client

Action = Callable[[Any], Awaitable[bool]]


def before_each(
    api: client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path_suffix: str,
    action: Action,
) -> None:
    """Run `action(body)` before each matching request of `api` while it keeps returning True."""
    original = api.call_api
    active = True

    async def call_api(verb: str, url: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal active
        if active and verb == method and urlsplit(url).path.endswith(path_suffix):
            body = kwargs.get("body", args[1] if len(args) > 1 else None)
            active = await action(body)
        return await original(verb, url, *args, **kwargs)

    monkeypatch.setattr(api, "call_api", call_api)
