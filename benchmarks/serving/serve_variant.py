"""``fedserve-serve`` with one interpreter setting changed, for :mod:`benchmarks.serving.p99_floor`.

    python -m benchmarks.serving.serve_variant MODE [fedserve-serve overrides ...]

``MODE``: ``default``; ``freeze`` (``gc.freeze()`` before serving is imported: the startup objects
leave the collector's generations); ``nogc`` (``gc.disable()``); ``switch<us>``
(``sys.setswitchinterval(<us> / 1e6)``: how long a thread waits for the GIL).
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    mode = sys.argv.pop(1)
    if mode == "freeze":
        gc.freeze()
    elif mode == "nogc":
        gc.disable()
    elif mode.startswith("switch"):
        sys.setswitchinterval(float(mode[len("switch") :]) / 1e6)
    elif mode != "default":
        raise SystemExit(f"unknown mode {mode!r}: default, freeze, nogc or switch<us>")
    sys.argv[0] = "fedserve-serve"
    from serving.cli import main as serve  # after the setting: serving's objects are made under it

    serve()


if __name__ == "__main__":
    main()
