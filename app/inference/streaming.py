"""An engine stream as server-sent events, for POST /generate and the /v1 completions.

Each item is read in a worker thread. When the client goes away, Starlette cancels `messages()`
while it waits for an item: the wait is abandoned at once, `cancelled` stops the generation
within a token, and closing the stream (shielded from the cancellation) waits for its thread and
frees the engine for the next request. (Gone while a message was being sent, the response's
background task, `stop()`, does the same.)

The threads come from a limiter of the stream's own, not the default pool: requests that wait
for the engine lock may hold all of that, and the stream holding the lock must move.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable

import anyio
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app import sse
from app.inference.engine import Generation, InferenceEngine, StreamItem, TextStream

logger = logging.getLogger(__name__)

# The JSON payloads (without "data: ") one stream item becomes.
Render = Callable[[StreamItem], Iterable[str]]
# The JSON payload that reports an error after the stream started.
RenderError = Callable[[str], str]


class ServerSentEvents:
    def __init__(
        self,
        stream: TextStream,
        cancelled: threading.Event,
        render: Render,
        render_error: RenderError,
    ) -> None:
        self._stream = stream
        self._cancelled = cancelled
        self._render = render
        self._render_error = render_error
        self._threads = anyio.CapacityLimiter(3)  # a read, an abandoned read, a close

    async def messages(self) -> AsyncIterator[str]:
        try:
            while (item := await self._read()) is not None:
                for payload in self._render(item):
                    yield sse.message(payload)
            yield sse.DONE
        except Exception as error:  # the status line is sent: report the error in the stream
            logger.exception("streamed generation failed")
            message = f"Internal error ({type(error).__name__}) during generation; see logs."
            yield sse.message(self._render_error(message))
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop()

    async def stop(self) -> None:
        """End the generation if it still runs (within a token) and free the engine; idempotent."""
        self._cancelled.set()
        await anyio.to_thread.run_sync(self._stream.close, limiter=self._threads)

    async def _read(self) -> StreamItem | None:
        return await anyio.to_thread.run_sync(
            next, self._stream, None, abandon_on_cancel=True, limiter=self._threads
        )


async def stream_response(
    engine: InferenceEngine, generation: Generation, render: Render, render_error: RenderError
) -> StreamingResponse:
    """Prepare the generation (its 4xx errors raise here, before any byte is sent), then answer
    `text/event-stream`: the rendered items, then `data: [DONE]`."""
    cancelled = threading.Event()
    stream = await run_in_threadpool(engine.stream, generation, cancelled)
    events = ServerSentEvents(stream, cancelled, render, render_error)
    # stop() also runs when the client went away while a message was being sent.
    return sse.event_stream(events.messages(), background=BackgroundTask(events.stop))
