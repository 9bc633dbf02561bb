"""Pipe-backed queues between the HTTP process and LitServe's inference workers.

LitServe (0.2.19) sends every request, and two messages back per request (a start notice and the answer), through
``multiprocessing`` *manager* queues: each ``put`` and each ``get`` is a round trip to the manager process, made
while the caller waits. In the HTTP process the request's ``put`` blocks the event loop for that round trip, and
each message back costs a hand-off to a thread of the default executor. (LitServe's ``fast_queue=True`` was meant
to replace the answers' queues by ZeroMQ, but 0.2.19 passes its choice to ``TransportConfig`` under a keyword the
model ignores, so it changes nothing.)

:class:`PipeQueueServer` keeps LitServe's loops and only swaps what they read and write: plain
``multiprocessing.Queue`` objects, which are pipes. A ``put`` returns at once (a feeder thread of the sending process
pickles and writes), and a ``get`` reads the pipe. In the HTTP process one reader thread per queue waits for
answers and hands everything that has arrived to the event loop in one call. Measured in ``benchmarks/load_test.py``
(see the README's "Server under load").

The swap reaches into LitServe's private set-up (``_init_manager``, ``litapi_request_queues``, ``_transport``):
:func:`install_pipe_queues` checks that layout first and, where a LitServe version differs, keeps LitServe's own
queues and says so in the log. ``hf-tome serve --queues litserve`` keeps them always.

One difference in kind: workers share the request queue's read lock, and a worker killed while it holds it (inside a
``get``) would leave it held. LitServe ends the whole server when a worker dies (``restart_workers=False``, its
default, which ``hf-tome serve`` keeps), so that never stalls a server that goes on running.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from typing import Any

import litserve as ls
from litserve.transport.base import MessageTransport

__all__ = ["PipeQueueServer", "PipeTransport", "install_pipe_queues"]

logger = logging.getLogger("hf_tome_server")


class PipeTransport(MessageTransport):
    """LitServe's answer transport over one ``multiprocessing.Queue`` per HTTP process (consumer).

    Workers ``send`` without waiting. In the consuming process the first ``areceive`` starts a daemon thread that
    blocks on the queue and passes each group of arrived items to the event loop with one
    ``call_soon_threadsafe``; ``areceive`` then awaits an ``asyncio.Queue``.
    """

    def __init__(self, queues: list[Any]) -> None:
        self._queues = queues
        self._closed = False
        self._inboxes: dict[int, asyncio.Queue] = {}  # per process: never pickled, empty after a fork

    def __getstate__(self) -> dict:
        return {"_queues": self._queues, "_closed": self._closed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_queues"])
        self._closed = state["_closed"]

    def send(self, item: Any, consumer_id: int) -> None:
        self._queues[consumer_id].put(item)

    async def areceive(self, consumer_id: int = 0, timeout: float | None = None, block: bool = True) -> Any:
        """The next item for ``consumer_id``; ``None`` when ``timeout`` passes first (LitServe reads on then)."""
        if self._closed:
            raise asyncio.CancelledError("transport closed")
        inbox = self._inbox(consumer_id)
        if timeout is None:
            return await inbox.get()
        try:
            return await asyncio.wait_for(inbox.get(), timeout)
        except TimeoutError:
            return None

    def _inbox(self, consumer_id: int) -> asyncio.Queue:
        inbox = self._inboxes.get(consumer_id)
        if inbox is None:
            inbox = self._inboxes[consumer_id] = asyncio.Queue()
            reader = threading.Thread(target=_read_into, args=(self._queues[consumer_id], asyncio.get_running_loop(),
                                                               inbox), name=f"hf-tome-answers-{consumer_id}",
                                      daemon=True)
            reader.start()
        return inbox

    def close(self, send_sentinel: bool = True, **kwargs: Any) -> None:
        self._closed = True
        if send_sentinel:  # as LitServe's own transport does: a None wakes a reader, which LitServe skips
            for pipe in self._queues:
                pipe.cancel_join_thread()  # exiting never waits for a reader that is gone
                pipe.put(None)


def _read_into(pipe: Any, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue) -> None:
    """Blocks on ``pipe``; hands the loop every item that has arrived, in one call (a batch's answers come together).

    Ends when the queue or the event loop is closed. A message that cannot be unpickled is logged and skipped: the
    thread must outlive it, or every later answer would wait until LitServe's timeout.
    """
    while True:
        items: list[Any] = []
        try:
            items.append(pipe.get())
            while True:
                items.append(pipe.get_nowait())
        except queue.Empty:
            pass
        except (EOFError, OSError, ValueError):  # the queue was closed: the process is ending
            return
        except Exception as error:  # noqa: BLE001  an unreadable message: skip it, keep what came before it
            logger.error("an answer from an inference worker could not be read: %s", type(error).__name__)
        if not items:
            continue
        try:
            loop.call_soon_threadsafe(_put_all, inbox, items)
        except RuntimeError:  # the event loop has closed
            return


def _put_all(inbox: asyncio.Queue, items: list[Any]) -> None:
    for item in items:
        inbox.put_nowait(item)


def install_pipe_queues(server: ls.LitServer, num_consumers: int) -> bool:
    """Replace the request queues and the answer transport LitServe just made; ``False`` (and a log line) where this
    LitServe version lays them out differently, which keeps its own."""
    request_queues = getattr(server, "litapi_request_queues", None)
    if not isinstance(request_queues, dict) or not request_queues or not hasattr(server, "_transport"):
        logger.warning("this LitServe version (%s) sets up its queues differently: serving with its own manager "
                       "queues", getattr(ls, "__version__", "unknown"))
        return False
    context = multiprocessing.get_context("spawn")  # LitServe spawns its workers (and forks its HTTP processes)
    for path in request_queues:
        request_queues[path] = context.Queue()
    server._transport = PipeTransport([context.Queue() for _ in range(num_consumers)])
    return True


class PipeQueueServer(ls.LitServer):
    """A ``LitServer`` whose requests and answers travel through pipes instead of manager queues (see above).

    ``model_metadata["queues"]`` (shown by ``/info``) says which queues serve: ``"pipe"`` once the swap is done, else
    what the caller put there (``hf-tome serve`` puts ``"litserve"``, so a LitServe that never calls this hook is
    reported as it runs).
    """

    def _init_manager(self, num_api_servers: int):  # noqa: ANN202  (LitServe's multiprocessing manager)
        manager = super()._init_manager(num_api_servers)
        self.hf_tome_pipe_queues = install_pipe_queues(self, num_api_servers)
        if self.hf_tome_pipe_queues and isinstance(self.model_metadata, dict):
            self.model_metadata["queues"] = "pipe"  # the HTTP processes fork after this: their /info shows it
        return manager
