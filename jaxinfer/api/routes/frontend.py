"""The chat page at `/`: jaxinfer/api/static/ served as it is, to talk to this server's /v1 API.

Plain HTML, CSS and JavaScript (ES modules), with no build step: no bundler, no npm, no framework.
The page is small enough to read in its source, the files in the package are the files the browser
runs, and installing the package is all a server needs. Nothing is fetched from anywhere else, and
the Content-Security-Policy says so to the browser: everything from this server's origin only, no
inline scripts or styles. `create_app(..., disable_frontend=True)` (`--disable-frontend`) serves
none of it. The page and its files need no API key; the page asks for one when /v1 answers 401.
"""

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CONTENT_SECURITY_POLICY = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


async def chat_page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


def frontend_routes() -> list:
    return [Route("/", chat_page, methods=["GET"]), Mount("/static", StaticFiles(directory=STATIC_DIR))]
