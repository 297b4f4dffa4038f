"""Kernels for drills, each started while the drill before it still runs.

Starting a Python kernel takes most of the runner's fixed cost per notebook
(about 1.7 s of a 2 s run of an empty notebook on a 2-core host). A
`KernelStarter` launches the next drill's kernel in a background thread, so
that it boots while the current drill runs, and papermill then uses the kernel
it is given. The starter also imports trekeys into the new kernel. Each drill
still gets a fresh kernel of its own, started with the drill's own environment
and working folder, and shut down after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

logger = logging.getLogger(__name__)

KERNEL_NAME = "python3"
STARTUP_TIMEOUT_SECONDS = 60

# Imported into each kernel before its runbook runs.
PRELOAD = "import trekeys.runbook"


class KernelStarter:
    """Starts kernels one ahead, on an event loop of its own.

    The loop runs only in one thread at a time: the background thread while
    it starts a kernel, and the caller's thread while it shuts one down.
    """

    def __init__(self) -> None:
        # IPC sockets, so that no TCP port opens, under an absolute path of our
        # own: a relative one would follow papermill's changes of directory.
        # The folder name stays short because socket paths are limited to 107
        # bytes on Linux.
        self._socket_dir = tempfile.mkdtemp(prefix="trekeys-kernels-")
        self._started = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._pending: AsyncKernelManager | None = None
        self._error: BaseException | None = None

    def start_next(self, env: Mapping[str, str], cwd: Path) -> None:
        """Begin starting a kernel with `env` and `cwd` in the background."""
        self._join()
        # A folder per kernel: jupyter_client picks IPC names that do not exist
        # yet, and a kernel just launched may not have created its own.
        self._started += 1
        sockets = os.path.join(self._socket_dir, str(self._started))
        os.mkdir(sockets, 0o700)
        manager = AsyncKernelManager(
            kernel_name=KERNEL_NAME, transport="ipc", ip=os.path.join(sockets, "k")
        )
        manager.client_factory = ReadyKernelClient
        self._pending, self._error = manager, None

        def start() -> None:
            try:
                self._loop.run_until_complete(_start_and_preload(manager, env, cwd))
            except BaseException as exc:  # handed to the caller of take()
                self._error = exc

        self._thread = threading.Thread(target=start, name="kernel-start", daemon=True)
        self._thread.start()

    def take(self) -> AsyncKernelManager:
        """Return the kernel started last, waiting until it is launched.

        Raises:
            Exception: whatever starting the kernel raised.
        """
        self._join()
        manager, self._pending = self._pending, None
        if self._error is not None or manager is None:
            error = self._error or RuntimeError("no kernel was started")
            self._error = None
            raise error
        return manager

    def shutdown(self, manager: AsyncKernelManager) -> None:
        """Shut a kernel down, killing it when it does not respond."""
        self._join()
        if not manager.has_kernel:
            return  # nbclient shut it down already
        if not self._loop.run_until_complete(manager.is_alive()):
            # Killed by the timeout or died: only its files are left to remove.
            try:
                self._loop.run_until_complete(manager.cleanup_resources())
            except Exception as exc:  # the files may be gone already
                logger.debug("kernel cleanup failed: %s", exc)
            return
        try:
            self._loop.run_until_complete(manager.shutdown_kernel(now=False))
        except Exception as exc:  # a dead or hung kernel; kill what is left
            logger.warning("kernel shutdown failed (%s); killing it", exc)
            kill_kernel(manager)

    def close(self) -> None:
        """Shut down a kernel that was started but never taken, and the loop."""
        self._join()
        if self._pending is not None and self._error is None:
            self.shutdown(self._pending)
        self._pending = None
        self._loop.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


async def _start_and_preload(
    manager: AsyncKernelManager, env: Mapping[str, str], cwd: Path
) -> None:
    """Start a kernel, wait until it responds, and import trekeys into it.

    Importing trekeys is about half a second of every runbook's first cell, so
    doing it here moves that time into the background too. The import runs
    silently, so the runbook's execution counts still start at 1.
    """
    await manager.start_kernel(env=dict(env), cwd=str(cwd))
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=STARTUP_TIMEOUT_SECONDS)
        await client.execute_interactive(
            PRELOAD, silent=True, store_history=False, timeout=STARTUP_TIMEOUT_SECONDS
        )
    finally:
        client.stop_channels()


class ReadyKernelClient(AsyncKernelClient):
    """A kernel client whose readiness check ends as soon as both channels work.

    jupyter_client 8 ends ``wait_for_ready`` with a fixed 0.2 s pause to drain
    the IOPub channel, which nbclient pays once per drill. This check instead
    sends ``kernel_info`` requests until the kernel's idle status for one of
    them arrives on IOPub, which also proves that IOPub is subscribed.
    nbclient skips the leftover replies, whose parents are not its requests.
    """

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        limit = STARTUP_TIMEOUT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + limit
        requests: set[str] = set()
        while time.monotonic() < deadline:
            requests.add(self.kernel_info())
            if await self._idle_status_arrives(requests, wait=0.1):
                return
            if not await self.is_alive():
                raise RuntimeError("the kernel died before it was ready")
        raise RuntimeError(f"the kernel was not ready within {limit:g} s")

    async def _idle_status_arrives(self, requests: set[str], wait: float) -> bool:
        while True:
            try:
                message = await self.iopub_channel.get_msg(timeout=wait)
            except queue.Empty:
                return False
            parent = message.get("parent_header", {}).get("msg_id")
            state = message.get("content", {}).get("execution_state")
            if parent in requests and state == "idle":
                return True


def manager_class_for(manager: AsyncKernelManager) -> type[AsyncKernelManager]:
    """Return a kernel manager class whose construction yields `manager` itself.

    Given as papermill's ``kernel_manager_class``, it makes nbclient adopt the
    started kernel as its own, so that nbclient also closes its client's
    channels and shuts the kernel down at the end, as for a kernel it started.
    Passing the manager as ``km`` instead leaves the channels open.
    """

    class AdoptedKernelManager(AsyncKernelManager):
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            # `manager` is not an instance of this class, so Python does not
            # run __init__ on it again.
            return manager

    return AdoptedKernelManager


def kill_kernel(manager: Any) -> None:
    """Kill a kernel's process group, which also stops tools a cell started."""
    # jupyter_client starts each kernel in a session of its own, so its process
    # group contains the kernel and its children but never this process.
    provisioner = getattr(manager, "provisioner", None)
    pid = getattr(provisioner, "pid", None)
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
