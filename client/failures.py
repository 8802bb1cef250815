"""A failing client handler answers with one error reply, its reason one line; the trace at DEBUG.

Left to Flower, an exception in a ClientApp handler is logged on its way up (in simulation: Ray's
traceback of the actor, then the engine's log of the exception and of its traceback) and the
reason the server receives holds the whole traceback once more: ~3 full traces per failure, and
the server's one line about it grows to dozens. :func:`error_reply_on_failure` catches the
exception where it happens instead: the full trace is logged once, at DEBUG, with the node id,
and the reply is an error ``Message`` (code ``CLIENT_APP_RAISED_EXCEPTION``) whose reason is
``"<ExceptionType>: <first line of its message>"``, which the server logs in one line with the
node id.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]

#: a reason longer than this is cut (a message can embed whole arrays or paths)
MAX_REASON = 300


def reason_of(exc: BaseException) -> str:
    """``"<ExceptionType>: <first line of the message>"``, at most :data:`MAX_REASON` chars."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def error_reply_on_failure(handler: Handler) -> Handler:
    """Wrap a ClientApp handler: an exception becomes an error reply to the message."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure is the reply, never a crash
            log.debug("%s on node %s failed", handler.__name__, context.node_id, exc_info=True)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason_of(exc))
            return Message(error, reply_to=msg)

    return wrapped
