"""Parent-death watch: the processes a launcher started die with it, even when it is SIGKILLed.

Flower's SuperLink starts ``flower-superexec`` in a session of its own, which starts
``flwr-simulation``, which starts Ray; a SIGKILLed ``fedserve-train`` cannot stop them, and
``PR_SET_PDEATHSIG`` would reach only its direct children. So every process a launcher starts
carries ``FEDSERVE_RUN_MARKER=<id>`` in its environment (inherited by everything below it, however
it is re-parented), and the launcher starts one small watch process holding the read end of a pipe
whose write end only the launcher has. The kernel closes that end when the launcher exits for any
reason; the watch then sees end-of-file and stops every process that carries the marker.
On a normal exit the launcher has already stopped them, and the sweep finds nothing.

Run as ``python -m server.orphan_watch <marker>`` (its own environment does not carry the marker).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from server.processes import RUN_MARKER, marker_env, stop_marked


class OrphanWatch:
    """A watch process for a new marker, and the write end of its pipe (see the module docstring).

    Use as a context manager around the processes it guards; give them :meth:`env`.
    """

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != RUN_MARKER}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.orphan_watch", self.marker],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            # its own session: a Ctrl-C to the terminal's process group must not stop the watch
            # before the launcher is gone
            start_new_session=True,
        )

    def env(self) -> dict[str, str]:
        """The variables that put a process under this watch."""
        return marker_env(self.marker)

    def close(self, timeout: float = 10.0) -> None:
        """End the watch: it sweeps once more (a no-op after a clean stop) and exits."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> OrphanWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0]:
        print("usage: python -m server.orphan_watch <marker>", file=sys.stderr)
        return 2
    sys.stdin.buffer.read()  # returns at end-of-file: the launcher closed the pipe or died
    stopped = stop_marked(args[0])
    if stopped:
        print(
            f"orphan watch: stopped {len(stopped)} process(es) left behind: {', '.join(stopped)}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
