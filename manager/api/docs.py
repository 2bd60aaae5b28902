"""The API's interactive documentation, ``GET /docs``, served without a CDN.

FastAPI's own page loads Swagger UI from cdn.jsdelivr.net and its favicon from
fastapi.tiangolo.com, so on a closed network it is blank. This one takes Swagger UI's
files from the ``fastapi-offline`` wheel (their version comes with the lock) and serves
them under ``/docs/assets/``. Like ``/openapi.json`` the page needs no token, whatever
``api.open_status`` says: it shows the API's shape, not its data, and every call tried from
it needs a token given through its "Authorize" button. ReDoc is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

#: The page, and where its JavaScript, CSS and favicon are served.
DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
#: The package carrying Swagger UI's dist files, and its folder that holds them.
_ASSETS_PACKAGE = ("fastapi_offline", "static")


def add_docs(app: FastAPI) -> None:
    """Serve the Swagger UI page and its assets on ``app``, which must have been made with
    ``docs_url=None`` (so FastAPI adds no CDN page of its own at the same path)."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the docs page needs the OpenAPI document: keep app.openapi_url")
    app.mount(ASSETS_URL, StaticFiles(packages=[_ASSETS_PACKAGE]), name="docs-assets")

    @app.get(DOCS_URL, response_class=HTMLResponse, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # root_path: the prefix a reverse proxy serves the API under, as FastAPI's own page.
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        )
