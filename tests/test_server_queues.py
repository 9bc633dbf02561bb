"""The pipe-backed queues between the server's HTTP process and LitServe's workers (:mod:`hf_tome_server.queues`).

The whole server over them is tested in test_server.py (every answer there travels through them, and one test
compares them with LitServe's own queues); here the parts, in and across processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle

import litserve as ls
import pytest
from hf_tome_server.queues import PipeQueueServer, PipeTransport, install_pipe_queues


def _send_from_worker(transport: PipeTransport, count: int) -> None:
    """What a LitServe worker does: answers as (uid, (response, status, type, worker id)) tuples."""
    for index in range(count):
        transport.send((f"uid-{index}", ({"index": index}, "OK", "REGULAR", 0)), consumer_id=0)


def _receive(transport: PipeTransport, count: int, timeout: float = 60) -> list:
    async def receive_all() -> list:
        return [await asyncio.wait_for(transport.areceive(0), timeout) for _ in range(count)]

    return asyncio.run(receive_all())


def test_answers_sent_by_a_spawned_worker_arrive_in_order() -> None:
    context = multiprocessing.get_context("spawn")  # as LitServe starts its workers: the transport is pickled
    transport = PipeTransport([context.Queue()])
    worker = context.Process(target=_send_from_worker, args=(transport, 300))
    worker.start()
    received = _receive(transport, 300)
    worker.join(timeout=60)
    assert worker.exitcode == 0
    assert [item[0] for item in received] == [f"uid-{index}" for index in range(300)]
    assert received[7] == ("uid-7", ({"index": 7}, "OK", "REGULAR", 0))


def test_each_consumer_reads_only_its_own_queue() -> None:
    context = multiprocessing.get_context("spawn")
    transport = PipeTransport([context.Queue(), context.Queue()])
    transport.send("for one", consumer_id=1)
    transport.send("for zero", consumer_id=0)

    async def both() -> tuple:
        return await transport.areceive(1), await transport.areceive(0), await transport.areceive(0, timeout=0.2)

    assert asyncio.run(both()) == ("for one", "for zero", None)  # None: nothing more came within the timeout


def test_pickling_keeps_the_queues_and_drops_the_process_local_reader() -> None:
    context = multiprocessing.get_context("spawn")
    transport = PipeTransport([context.Queue()])
    transport.send("first", consumer_id=0)
    assert _receive(transport, 1) == ["first"]
    assert list(transport._inboxes) == [0]  # this process now reads consumer 0
    state = transport.__getstate__()
    assert set(state) == {"_queues", "_closed"}
    copy = PipeTransport.__new__(PipeTransport)
    copy.__setstate__(state)
    assert copy._inboxes == {} and copy._queues == transport._queues and copy._closed is False
    with pytest.raises(RuntimeError, match="Queue objects should only be shared between processes through inheritance"):
        pickle.dumps(transport)  # outside a spawn: the queues refuse, as LitServe's own would


def test_closing_wakes_the_reader_with_none_and_refuses_further_reads() -> None:
    context = multiprocessing.get_context("spawn")
    transport = PipeTransport([context.Queue()])

    async def close_while_waiting() -> object:
        waiting = asyncio.ensure_future(transport.areceive(0))
        await asyncio.sleep(0.05)
        transport.close(send_sentinel=True)
        return await asyncio.wait_for(waiting, 30)

    assert asyncio.run(close_while_waiting()) is None  # LitServe's reading loop skips a None
    with pytest.raises(asyncio.CancelledError, match="transport closed"):
        asyncio.run(transport.areceive(0))


def _refuse_to_unpickle() -> None:
    raise LookupError("this object cannot be rebuilt")


class _Unreadable:
    """Pickles fine and fails to unpickle, as an answer whose class the HTTP process cannot import would."""

    def __reduce__(self):  # noqa: ANN204
        return _refuse_to_unpickle, ()


def test_an_unreadable_answer_is_logged_and_the_next_answers_still_arrive(caplog) -> None:
    transport = PipeTransport([multiprocessing.get_context("spawn").Queue()])

    async def around_a_bad_answer() -> list:
        transport.send("before", consumer_id=0)
        received = [await asyncio.wait_for(transport.areceive(0), 30)]  # the reader thread is running
        transport.send(_Unreadable(), consumer_id=0)
        transport.send("after", consumer_id=0)
        return [*received, await asyncio.wait_for(transport.areceive(0), 30)]

    with caplog.at_level(logging.ERROR, logger="hf_tome_server"):
        assert asyncio.run(around_a_bad_answer()) == ["before", "after"]
    assert "an answer from an inference worker could not be read: LookupError" in caplog.text


class _EchoAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, x):  # noqa: ANN001, ANN201
        return x


def test_the_server_swaps_litserves_manager_queues_for_pipes() -> None:
    server = PipeQueueServer(_EchoAPI(), accelerator="cpu", model_metadata={"queues": "litserve"})
    manager = server._init_manager(2)
    try:
        assert server.hf_tome_pipe_queues is True and server.model_metadata == {"queues": "pipe"}
        request_queue = server._get_request_queue("/predict")
        assert type(request_queue) is type(multiprocessing.get_context("spawn").Queue())
        assert isinstance(server._transport, PipeTransport) and len(server._transport._queues) == 2
        request_queue.put(("consumer", "uid", 0.0, {"x": 1}))
        assert request_queue.get(timeout=30) == ("consumer", "uid", 0.0, {"x": 1})
    finally:
        manager.shutdown()


def test_another_litserve_layout_keeps_litserves_queues_and_says_so(caplog) -> None:
    class Elsewhere:  # a LitServe version that keeps its queues under other names
        _transport = "litserve's own"

    server = Elsewhere()
    with caplog.at_level(logging.WARNING, logger="hf_tome_server"):
        assert install_pipe_queues(server, 1) is False
    assert server._transport == "litserve's own"
    assert f"this LitServe version ({ls.__version__}) sets up its queues differently" in caplog.text


def test_a_failed_swap_is_reported_as_litserves_queues(monkeypatch) -> None:
    import hf_tome_server.queues as queues

    monkeypatch.setattr(queues, "install_pipe_queues", lambda server, consumers: False)
    server = PipeQueueServer(_EchoAPI(), accelerator="cpu", model_metadata={"queues": "litserve"})
    manager = server._init_manager(1)
    try:
        assert server.hf_tome_pipe_queues is False and server.model_metadata == {"queues": "litserve"}
        assert not isinstance(server._transport, PipeTransport)  # LitServe's own, untouched
    finally:
        manager.shutdown()
