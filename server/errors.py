"""OpenAI's error shape for every failure: our own ``APIError``s, invalid bodies, unknown paths and methods."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError


def served_paths(app: FastAPI) -> list[str]:
    """The paths the app answers (for the unknown-endpoint message), in the order they were added."""
    return list(dict.fromkeys(r.path.replace(":path", "") for r in app.routes if isinstance(r, APIRoute)))


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status != 499:  # a disconnect is counted per choice where it is detected
        request.app.state.server.metrics.request_done(exc.status, None)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's first error as a 400 naming the parameter (``messages.0.role``)."""
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    message = err.get("msg", "invalid request").removeprefix("Value error, ")  # our validators' own words
    if err.get("type") == "json_invalid":  # its location is a character offset, not a parameter
        message, loc = "We could not parse the JSON body of your request.", []
    elif not loc and err.get("type") == "model_attributes_type":  # the body is no JSON object
        content_type = request.headers.get("content-type", "")
        message = "The request body must be a JSON object" + ("" if "json" in content_type else
                  f" sent with 'Content-Type: application/json' (this one's is {content_type or 'missing'})")
    api = APIError(400, f"{message}" + (f" (at {'.'.join(loc)})" if loc else ""),
                   ".".join(loc) or None, err.get("type"))
    return await api_error(request, api)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods get OpenAI's error shape too (FastAPI's default is ``{"detail": ...}``)."""
    paths = served_paths(request.app)
    messages = {404: f"Unknown endpoint {request.url.path}: this server serves {', '.join(paths)}",
                405: f"Method {request.method} is not allowed on {request.url.path}"}
    codes = {404: "unknown_url", 405: "method_not_allowed"}
    api = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), None,
                   codes.get(exc.status_code), headers=dict(exc.headers or {}))
    return await api_error(request, api)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
