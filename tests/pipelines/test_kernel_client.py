"""The pipeline runner's kernel client reads a message whose wake-up was lost (pyzmq's edge-triggered descriptor).

CI saw a notebook cell whose kernel sent its ``execute_reply`` within 0.1 s wait until nbclient's 300 s timeout: the
reply sat in the shell socket (ZMQ_EVENTS said POLLIN) while the asyncio poll waiting on it never woke. Here the
same loss is made on purpose: the message arrives and the descriptor's edge is taken before the event loop looks.
"""

from __future__ import annotations

import asyncio

import pytest

zmq = pytest.importorskip("zmq")
pytest.importorskip("jupyter_client")


async def _lost_wakeup(channel_cls):
    """A ``channel_cls`` on one end of a PAIR whose waiting ``get_msg()`` misses the arrival of a message: the task
    waiting for it (unfinished) and, once it is done, the message."""
    import zmq.asyncio
    from jupyter_client.session import Session

    ctx = zmq.asyncio.Context()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sender.bind("inproc://lost-wakeup")
    receiver.connect("inproc://lost-wakeup")
    session = Session(key=b"")
    channel = channel_cls(receiver, session, asyncio.get_running_loop())
    task = asyncio.create_task(channel.get_msg(timeout=None))
    while not receiver._recv_futures:  # until the task's poll waits on the receiver's descriptor
        await asyncio.sleep(0)
    session.send(zmq.Socket.shadow(sender.underlying), "execute_reply", {"status": "ok"})
    zmq.Socket.shadow(receiver.underlying).get(zmq.EVENTS)  # takes the edge before the loop sees it
    return task, (ctx, sender, receiver)


def test_a_message_whose_wakeup_was_lost_is_still_read():
    from jupyter_client.channels import AsyncZMQSocketChannel

    from llmops_jupyter.pipelines.kernel_client import SlicedPollChannel

    async def main():
        plain, keep_plain = await _lost_wakeup(AsyncZMQSocketChannel)
        _done, pending = await asyncio.wait({plain}, timeout=2.0)
        assert plain in pending  # the loss is real: without slices the wait never ends
        plain.cancel()
        sliced, keep = await _lost_wakeup(SlicedPollChannel)
        msg = await asyncio.wait_for(sliced, 120)
        assert msg["header"]["msg_type"] == "execute_reply" and msg["content"] == {"status": "ok"}
        for ctx, *socks in (keep_plain, keep):
            for s in socks:
                s.close(linger=0)
            ctx.term()

    asyncio.run(main())


def test_pipeline_kernels_and_the_suites_notebook_clients_use_it():
    from llmops_jupyter.pipelines.execute import _kernel_manager_class
    from llmops_jupyter.pipelines.kernel_client import SlicedPollChannel, SlicedPollKernelManager

    for manager in (_kernel_manager_class({}, None)(), SlicedPollKernelManager()):
        client = manager.client()
        assert client.shell_channel_class is SlicedPollChannel and client.iopub_channel_class is SlicedPollChannel
