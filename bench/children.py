"""Run a function in a fresh (spawned) process: clean memory, no torch in the benchmark's own."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any


def _child(send: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        send.send(("ok", fn(*args)))
    except BaseException:
        send.send(("error", traceback.format_exc()))


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        status, value = recv.recv()
    except EOFError as exc:
        proc.join(10)
        raise RuntimeError(f"{fn.__name__} died (exit code {proc.exitcode})") from exc
    except BaseException:  # Ctrl-C, SIGTERM: stop the child now
        proc.terminate()
        raise
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value
