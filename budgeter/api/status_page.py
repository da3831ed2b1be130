"""``GET /``: a self-contained status page over ``GET /admin/status``.

The HTML (inline CSS and JS, no external assets) asks for the admin token itself (from
``#token=...`` or a small form) and refreshes every 2 s; the page is public, the data is not.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@cache
def status_page_html() -> str:
    return resources.files("budgeter.api").joinpath("status_page.html").read_text(encoding="utf-8")


async def status_page(_request: web.Request) -> web.Response:
    return web.Response(
        text=status_page_html(),
        content_type="text/html",
        charset="utf-8",
        headers=HEADERS,
    )


def add_status_page(app: web.Application) -> None:
    """Register ``GET /`` (and HEAD) serving the status page."""
    app.router.add_get("/", status_page)
