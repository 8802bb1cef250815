"""A no-op KServe-shaped endpoint: reads the body, answers pre-recorded bytes (by body size).

    python -m benchmarks.serving.noop_app PORT ANSWERS_JSON

``ANSWERS_JSON`` maps a request body's size to (response body as hex, its JSON header length),
recorded from our server (:func:`benchmarks.serving.servers.noop_server`). It runs on the same
uvicorn call as ``serving/cli.py`` (uvicorn's defaults: uvloop + httptools here, one worker), so
comparing our server to it isolates what our server adds on top of the HTTP stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.protocol import HEADER_LENGTH


def create_app(answers: dict[int, tuple[bytes, str]]) -> FastAPI:
    """The endpoint: POST ``/v2/models/{name}/infer`` answers ``answers[len(body)]``; GET
    ``/v2/health/ready`` answers 200."""

    async def infer(request: Request) -> Response:
        payload, header_length = answers[len(await request.body())]
        return Response(
            payload, media_type="application/octet-stream", headers={HEADER_LENGTH: header_length}
        )

    async def ready(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.router.routes.append(Route("/v2/models/{name}/infer", infer, methods=["POST"]))
    app.router.routes.append(Route("/v2/health/ready", ready, methods=["GET"]))
    return app


def main(argv: list[str]) -> None:
    port, answers_file = int(argv[0]), Path(argv[1])
    recorded = json.loads(answers_file.read_text())
    answers = {int(k): (bytes.fromhex(v[0]), str(v[1])) for k, v in recorded.items()}
    uvicorn.run(
        create_app(answers), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main(sys.argv[1:])
