"""The explorer page of `loramix serve`: GET / answers a static page (index.html, page.js, page.css in this
folder, shipped as package data: no build step, nothing loaded from elsewhere) that streams a completion through
the public API and draws each token's expert mix as it arrives.

The page is the same client any other is: it fetches /v1/models, /v1/completions and /v1/chat/completions on its
own origin, with `xlora.return_scalings: "layers"`, and sends the API key typed into it (kept in the tab's memory
only) as `Authorization: Bearer KEY`. Its three files need no key and hold nothing about the served model; a
Content-Security-Policy keeps the page to its own origin (no inline script, no other host), and no route sends
CORS headers, so other sites cannot read the API from a visitor's browser.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

PAGE_FILES = {  # route -> (file in this folder, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page/page.css": ("page.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(PAGE_FILES)  # the routes that answer without the API key

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_file(name: str) -> bytes:
    """The bytes of one of the page's files, read from the installed package (a wheel or a source tree)."""
    return resources.files(__package__).joinpath(name).read_bytes()


def add_page_routes(app: FastAPI) -> None:
    """GET /, /page/page.js and /page/page.css, read once here, left out of the OpenAPI document."""
    for route, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(route, _static(page_file(name), media_type), methods=["GET"], include_in_schema=False)


def _static(body: bytes, media_type: str):
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)
    return serve
