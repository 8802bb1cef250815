"""For the model-store tests: moto's S3 server (:mod:`benchmarks.storage.moto_s3`) reached
through a TCP proxy the tests can take down (the store "goes away": connections are refused) and
bring back with the data intact."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from benchmarks.storage.moto_s3 import s3_env
from server.processes import free_port

BUCKET = "models"


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`down` refuses and cuts every
    connection, :meth:`up` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def store_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables s3fs/botocore read: dummy credentials, the local endpoint,
    one attempt per call (the tests take the store down on purpose)."""
    return {**s3_env(endpoint), "AWS_MAX_ATTEMPTS": "1"}


def fresh_s3fs() -> None:
    """s3fs caches filesystem instances (and their endpoint) per process: start anew."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


def make_bucket(name: str = BUCKET) -> None:
    import fsspec

    fresh_s3fs()
    fs = fsspec.filesystem("s3")
    if not fs.exists(name):
        fs.mkdir(name)


def env_of(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}
