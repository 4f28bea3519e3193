"""What the front serves while the ranks load, and the switch to the real app.

The front listens before the ranks start: the status page, GET /v1/status
and GET /health show each rank's progress, which the launcher reads from
the ranks' output; every other path is a 503 that says how far loading is
(or why it failed), with Retry-After. Once rank 0's engine runs, Switch
passes every request to the app of create_app instead.
"""

import threading
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .http import error_body
from .status import status_router

RETRY_AFTER = 5  # seconds a client is told to wait while the ranks load
FIELDS = {"host": str, "stage": str, "loaded_bytes": int, "load_total_bytes": int, "progress": float}


class Loading:
    """Each rank's progress as the launcher last read it (a dict per rank,
    see status_router), and the failure it found, if any."""

    def __init__(self, size: int):
        self._ranks = [{"rank": r, "stage": "starting", "progress": 0.0} for r in range(size)]
        self.failure: Optional[str] = None

    def update(self, reports: List[dict]) -> None:
        for report in reports:
            rank = report.get("rank")
            if isinstance(rank, int) and 0 <= rank < len(self._ranks):
                self._ranks[rank] = {"rank": rank, **{k: t(report[k]) for k, t in FIELDS.items() if k in report}}

    def ranks(self) -> List[dict]:
        return [dict(r) for r in self._ranks]

    def fraction(self) -> float:
        """The share of the loading done, over every rank."""
        return round(sum(min(1.0, max(0.0, r.get("progress", 0.0))) for r in self._ranks) / len(self._ranks), 4)


def loading_app(loading: Loading, model_id: str, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="mlx-moe (loading)")
    app.include_router(status_router(None, model_id, loading=loading))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        # As the real app: the page's data needs the key, the page and /health do not.
        if api_key and request.url.path == "/v1/status" and \
                request.headers.get("authorization") != f"Bearer {api_key}" and \
                request.headers.get("x-api-key") != api_key:
            return JSONResponse(error_body("Missing or wrong API key.", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def _not_yet(request, e):
        # Every path the loaded server will have (and any other): not yet.
        message = loading.failure or f"the model is loading ({100 * loading.fraction():.0f}%)"
        return JSONResponse(error_body(message, type="server_error", code="model_loading"), status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER)})

    return app


class Switch:
    """The ASGI app uvicorn serves: the loading app until `ready` is set,
    then `app` (see switch)."""

    def __init__(self, loading):
        self.loading, self.app = loading, None
        self.ready = threading.Event()

    def switch(self, app, ready: threading.Event) -> None:
        self.app, self.ready = app, ready

    async def __call__(self, scope, receive, send):
        await (self.app if self.ready.is_set() else self.loading)(scope, receive, send)
