"""Request bodies as JSON that names each field once: Python's decoder keeps the last of two, so
`{"prompt": "a cat", "prompt": "a dog"}` would draw a dog without a word. Such a body is refused
as JSON that cannot be read (app.errors words the answer)."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

TWICE = "a field is given twice: "


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise json.JSONDecodeError(TWICE + key, "", 0)
        seen[key] = value
    return seen


class _OnceEachRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_once_each)
        return self._json


class OnceEachRoute(APIRoute):
    """A route whose JSON body names each field at most once."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handle(_OnceEachRequest(request.scope, request.receive))

        return route
