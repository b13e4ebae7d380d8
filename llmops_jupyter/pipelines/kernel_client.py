"""A kernel client that never sleeps through a message that has arrived (pipeline runs and tests use it).

nbclient and papermill wait for a cell's ``execute_reply`` with ``await shell_channel.get_msg(timeout)``, that is
pyzmq's asyncio ``poll``, which wakes on the ZMQ socket's edge-triggered file descriptor. Now and then that wake-up
never comes: the reply sits in the socket (``ZMQ_EVENTS`` says POLLIN, a poll is waiting on it) and is read only
when the poll times out and pyzmq makes its last non-blocking check. Seen here on cells that write into widgets, in
about 1 run in 6: the kernel stamped its ``execute_reply`` 0.1 s after the request, and the client read it when the
cell's timeout (60 s, 300 s) ran out; a pipeline without ``--timeout`` would have waited for ever. (Edge-triggered
wake-ups lost to a consumed edge are a known class of pyzmq bug, e.g. zeromq/pyzmq#2173.)

:class:`SlicedPollChannel` polls in slices of :data:`POLL_SLICE_S` instead. Each slice ends in that same
non-blocking check, so a lost wake-up costs at most one slice, and the caller's timeout still holds. A message whose
wake-up comes is read at once, as before.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import DottedObjectName, Type

#: longest a message that has arrived can wait unseen
POLL_SLICE_S = 0.5


class SlicedPollChannel(AsyncZMQSocketChannel):
    """A channel whose ``get_msg(timeout)`` polls in slices of :data:`POLL_SLICE_S` (see the module docstring)."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            step = POLL_SLICE_S if left is None else max(0.0, min(POLL_SLICE_S, left))
            try:
                return await super().get_msg(timeout=step)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class SlicedPollKernelClient(AsyncKernelClient):
    """nbclient's asynchronous kernel client, its shell, IOPub and stdin channels polled in slices."""

    shell_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    stdin_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]


class SlicedPollKernelManager(AsyncKernelManager):
    """An AsyncKernelManager whose clients are :class:`SlicedPollKernelClient` (``NotebookClient(...,
    kernel_manager_class=SlicedPollKernelManager)``, papermill's ``kernel_manager_class``)."""

    client_class = DottedObjectName("llmops_jupyter.pipelines.kernel_client.SlicedPollKernelClient")
    # AsyncKernelManager declares client_factory with its own default, which wins over KernelManager's default
    # generator reading client_class: set both
    client_factory = Type(SlicedPollKernelClient, klass=AsyncKernelClient)
