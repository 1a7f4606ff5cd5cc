"""The playground page: ``GET /`` and ``GET /ui``, and its script and style sheet.

The files are package data, read through importlib.resources (so a wheel serves them too) once per
process. They hold no secret; the page sends the user's API key itself on every API call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["ui"])

# The page talks to this server only: a script injected through model text could reach no one else.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# no-cache: revalidated on each load (the ETag makes that a 304), so an upgraded server's page is
# never mixed with a cached script of the old one.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def _asset(name: str, media_type: str) -> _Asset:
    body = files("inferd.api.ui").joinpath(name).read_bytes()
    return _Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def _serve(request: Request, asset: _Asset, headers: dict[str, str]) -> Response:
    headers = headers | {"ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/", include_in_schema=False)
@router.get("/ui", include_in_schema=False)
async def page(request: Request) -> Response:
    """The playground's HTML."""
    asset = _asset("index.html", "text/html; charset=utf-8")
    return _serve(request, asset, _HEADERS | {"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY"})


@router.get("/ui/app.js", include_in_schema=False)
async def script(request: Request) -> Response:
    return _serve(request, _asset("app.js", "text/javascript; charset=utf-8"), _HEADERS)


@router.get("/ui/app.css", include_in_schema=False)
async def style(request: Request) -> Response:
    return _serve(request, _asset("app.css", "text/css; charset=utf-8"), _HEADERS)
