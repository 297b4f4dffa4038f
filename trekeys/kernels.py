"""Kernels for drills, each started while the drill before it still runs.

Starting a Python kernel takes most of the runner's fixed cost per notebook
(about 1.7 s of a 2 s run of an empty notebook on a 2-core host). A
`KernelStarter` launches the next drill's kernel in a background thread, so
that it boots while the current drill runs, and papermill then uses the kernel
it is given. Where it can, the kernel is a fork of a
`trekeys.kernel_forkserver` process that has already imported the modules the
runbook imports. Otherwise the starter imports them into the new kernel. Each
drill still gets a fresh kernel of its own, started with the drill's own
environment and working folder.

Stopping a kernel is moved off the drill's path as well: when nbclient stops
the kernel at the end of a drill, `DrillKernelManager` only sends the shutdown
request, and the starter waits for the process to exit in the background.
That wait can be long: ipykernel 7.4 sometimes hangs at exit, when its
control thread flushes output after the I/O thread has stopped, until
jupyter_client sends SIGTERM after half of ``shutdown_wait_time``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from trekeys.kernel_forkserver import (
    ForkedKernelProcess,
    ForkedKernelProvisioner,
    KernelForkServer,
)
from trekeys.kernel_imports import runbook_imports

logger = logging.getLogger(__name__)

KERNEL_NAME = "python3"
STARTUP_TIMEOUT_SECONDS = 60

# Imported into every kernel before its runbook runs.
PRELOAD_MODULES = ("trekeys.runbook",)

# A drill's kernel exits about 0.1 s after the shutdown request, or hangs (see
# above); jupyter_client sends SIGTERM after half of this wait.
SHUTDOWN_WAIT_SECONDS = 2.0

# No drill code is written to the administrator's IPython history database.
KERNEL_ARGUMENTS = ["--HistoryManager.hist_file=:memory:"]


class KernelStarter:
    """Starts kernels one ahead and stops them behind, on an event loop of its own.

    The loop runs in a background thread for the starter's whole life, so
    that a kernel can start while the caller runs a drill, and a kernel that
    is slow to stop delays neither the next drill nor the next start.
    """

    def __init__(self) -> None:
        # IPC sockets, so that no TCP port opens, under an absolute path of our
        # own: a relative one would follow papermill's changes of directory.
        # The folder name stays short because socket paths are limited to 107
        # bytes on Linux.
        self._socket_dir = tempfile.mkdtemp(prefix="trekeys-kernels-")
        self._started = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kernel-starter", daemon=True
        )
        self._thread.start()
        self._pending: tuple[DrillKernelManager, Future[None]] | None = None
        self._stopping: list[tuple[DrillKernelManager, Future[None]]] = []
        # Shared, because each new one searches the Jupyter paths again.
        self._spec_manager = KernelSpecManager()
        # The server starts now so that its imports overlap the caller's checks.
        self._server = KernelForkServer.start()

    def start_next(
        self,
        env: Mapping[str, str],
        cwd: Path,
        runbook: Path | None = None,
    ) -> None:
        """Begin starting a kernel with `env` and `cwd` in the background.

        The new kernel imports `PRELOAD_MODULES` and the modules `runbook`
        imports before `take` hands it out. A kernel started earlier and not
        taken is stopped.
        """
        self._stop_pending()
        # A folder per kernel: jupyter_client picks IPC names that do not exist
        # yet, and a kernel just launched may not have created its own.
        self._started += 1
        sockets = os.path.join(self._socket_dir, str(self._started))
        os.mkdir(sockets, 0o700)
        manager = DrillKernelManager(
            kernel_name=KERNEL_NAME,
            transport="ipc",
            ip=os.path.join(sockets, "k"),
            shutdown_wait_time=SHUTDOWN_WAIT_SECONDS,
            kernel_spec_manager=self._spec_manager,
        )
        manager.client_factory = ReadyKernelClient

        starting = _start_and_preload(manager, env, cwd, runbook, self._server)
        future = asyncio.run_coroutine_threadsafe(starting, self._loop)
        self._pending = (manager, future)

    def take(self) -> DrillKernelManager:
        """Return the kernel started last, waiting until it is launched.

        Raises:
            Exception: whatever starting the kernel raised.
        """
        if self._pending is None:
            raise RuntimeError("no kernel was started")
        (manager, future), self._pending = self._pending, None
        try:
            future.result()
        except BaseException:
            self.shutdown(manager)  # stops whatever part of it did start
            raise
        return manager

    def shutdown(self, manager: DrillKernelManager) -> None:
        """Finish stopping a kernel in the background; `close` waits for it.

        A kernel that does not stop in time is killed.
        """
        future = asyncio.run_coroutine_threadsafe(_finish_stop(manager), self._loop)
        self._stopping.append((manager, future))

    def _stop_pending(self) -> None:
        """Stop the kernel started last and not taken, once its start ends."""
        if self._pending is None:
            return
        (manager, starting), self._pending = self._pending, None
        stopping = _finish_stop(manager, after=starting)
        future = asyncio.run_coroutine_threadsafe(stopping, self._loop)
        self._stopping.append((manager, future))

    def close(self) -> None:
        """Stop every kernel still running, taken or not, and close the loop."""
        try:
            self._stop_pending()
            for _, future in self._stopping:
                future.result()
            self._stopping = []
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            try:
                if self._server is not None:
                    self._server.close()
            finally:
                shutil.rmtree(self._socket_dir, ignore_errors=True)


async def _start_and_preload(
    manager: AsyncKernelManager,
    env: Mapping[str, str],
    cwd: Path,
    runbook: Path | None,
    server: KernelForkServer | None,
) -> None:
    """Start a kernel, wait until it responds, and import modules into it.

    The modules are `PRELOAD_MODULES` and those `runbook` imports, which are
    up to a second of a runbook's first cells, so importing them here moves
    that time into the background. Reading the sources for them takes up to
    0.2 s, which is why that happens here too.

    A kernel forked from the fork server has them imported already. Any
    other kernel imports them silently and binds no name, so the runbook's
    execution counts still start at 1 and its namespace is empty. A module
    that fails to import is left for the runbook's own import cell to report.
    """
    modules = list(PRELOAD_MODULES)
    if runbook is not None:
        modules.extend(runbook_imports(runbook))
    if server is not None:
        manager.provisioner = ForkedKernelProvisioner.for_manager(
            manager, server, modules
        )
    await manager.start_kernel(
        env=dict(env), cwd=str(cwd), extra_arguments=KERNEL_ARGUMENTS
    )
    provisioner = manager.provisioner
    forked = isinstance(getattr(provisioner, "process", None), ForkedKernelProcess)

    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=STARTUP_TIMEOUT_SECONDS)
        if not forked:
            await client.execute_interactive(
                _preload_code(modules),
                silent=True,
                store_history=False,
                timeout=STARTUP_TIMEOUT_SECONDS,
            )
    finally:
        client.stop_channels()


def _preload_code(modules: Sequence[str]) -> str:
    # One statement per module and no loop variable, so that no name is bound.
    return "".join(
        f"try:\n    __import__({name!r})\nexcept Exception:\n    pass\n"
        for name in modules
    )


async def _finish_stop(
    manager: DrillKernelManager, after: Future[None] | None = None
) -> None:
    if after is not None:
        # Stopping a kernel that is still starting would race its start.
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(after)
    try:
        await manager.finish_stop()
    except Exception as exc:  # a dead or hung kernel; kill what is left
        logger.warning("kernel shutdown failed (%s); killing it", exc)
        kill_kernel(manager)


class DrillKernelManager(AsyncKernelManager):
    """A kernel manager whose graceful shutdown finishes later, off the drill's path.

    nbclient stops the kernel at the end of each drill and waits, checking
    every 0.1 s, until its process has exited: about a quarter of a second a
    drill. Here that stop only sends the shutdown request and keeps the
    kernel's files. `finish_stop`, which `KernelStarter` runs in the
    background, waits for the exit and removes the files. It kills the kernel
    when ``shutdown_wait_time`` passes.
    """

    stop_requested = False

    async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:  # type: ignore[override]
        if now or restart or not self.has_kernel:
            await super().shutdown_kernel(now=now, restart=restart)
            return
        self.stop_requested = True
        await self.request_shutdown()

    async def cleanup_resources(self, restart: bool = False) -> None:  # type: ignore[override]
        if not self.stop_requested:
            await super().cleanup_resources(restart=restart)

    async def finish_stop(self) -> None:
        """Wait for the kernel to exit, requesting the stop if needed, and clean up."""
        if self.stop_requested:
            await self.finish_shutdown()
        elif self.has_kernel and await self.is_alive():
            await super().shutdown_kernel(now=False)
        elif self.has_kernel and self.provisioner is not None:
            await self.provisioner.wait()  # reaps a kernel that was killed
        self.stop_requested = False
        await self.cleanup_resources()


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
