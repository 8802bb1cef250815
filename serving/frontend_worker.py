"""A front-end process: ``python -m serving.frontend_worker <link socket>``.

Started by the engine process (:mod:`serving.frontend_processes`) when ``serving.frontends > 1``.
It asks the engine process over the link for the config (with the ports already bound there),
serves the same HTTP and gRPC front ends on those ports (:func:`serving.servers.run_servers`,
joining them) over a :class:`~serving.dataplane_link.RemoteDataPlane`, and says it listens. It
stops on SIGTERM or SIGINT (draining its requests in flight) and when the link closes (the engine
process is gone: every call fails at once with 503, so the drain is short).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from serving.api import ApiSettings, create_app
from serving.dataplane_link import RemoteDataPlane
from serving.json_offload import JsonDecoder
from serving.servers import event_loop_factory, run_servers
from serving.settings import ServeConfig

log = logging.getLogger(__name__)


async def serve_frontends(link_path: str) -> None:
    """Serve until SIGTERM/SIGINT or the link closes (see the module)."""
    dataplane = RemoteDataPlane(link_path)
    await dataplane.connect()
    conf: ServeConfig = await dataplane.hello()
    logging.basicConfig(
        level=conf.log_level.upper(),
        format=f"%(asctime)s front end {os.getpid()} %(levelname)s %(name)s: %(message)s",
    )
    settings = conf.serving
    decoder = JsonDecoder(settings.json_offload_bytes, settings.json_offload_processes)
    app = create_app(
        dataplane, settings=ApiSettings.from_config(settings, conf.token), decoder=decoder
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link_lost = asyncio.ensure_future(dataplane.closed())

    def on_link_lost(_: asyncio.Future[None]) -> None:
        if not stop.is_set():
            log.warning("the engine process is gone; stopping")
        stop.set()

    link_lost.add_done_callback(on_link_lost)
    listening = asyncio.Event()
    try:
        serving = asyncio.ensure_future(
            run_servers(
                conf, app, dataplane, stop=stop, banner=lambda _: listening.set(), joining=True
            )
        )
        started = asyncio.ensure_future(listening.wait())
        await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if listening.is_set():
            await dataplane.listening(os.getpid())
        await serving
    finally:
        link_lost.cancel()
        dataplane.close()
        decoder.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.frontend_worker <link socket>", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve_frontends(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
