"""A fork server that starts drill kernels with their imports already done.

A Python kernel spends most of its start importing IPython, ipykernel and the
modules its runbook uses. On a 2-vCPU host that took about 0.5 s of CPU per
kernel, and a fork of a process that had imported them once about 0.2 s.
The runner starts one server per drill run (``python -m
trekeys.kernel_forkserver``) and requests each kernel from it by writing a JSON
line with the kernel's arguments, environment, working folder and the modules
to import first. The server imports those modules, forks, and returns the new
process id. The child becomes the kernel: it starts a session of its own,
takes the drill's environment and folder, and runs ipykernel's application.

A forked kernel is the server's child, not the runner's, so the runner
watches it through a pidfd (Linux 5.3 and later) and cannot read its exit
status. Where the server cannot be used (no pidfd, a kernelspec that names
another Python, a server that failed), kernels start the usual way.

The server imports modules with the runner's environment at the time the
server started, and drill environments add only the evidence file paths,
which trekeys reads when a check is recorded. The runner sends only trekeys
modules and what they import (`trekeys.kernel_imports`), because what an
import changes in the server reaches every later kernel, and only the
forking thread survives in a child. numpy's bundled OpenBLAS (numpy 2.4 here)
starts threads when imported, and restarts them in a forked child.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import platform
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner

from trekeys.errors import DrillError

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_SECONDS = 60
CLOSE_TIMEOUT_SECONDS = 5

# Imported by the server before its first fork: what every kernel imports
# while it starts, beyond what ipykernel's own modules import.
SERVER_MODULES = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.debugger",
    "IPython.core.completerlib",
    "IPython.core.oinspect",
    "IPython.display",
    "sqlite3",
    "tornado.platform.asyncio",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.extensions.storemagic",
    "psutil",
    # pykeepass imports the cipher mode when it first opens a vault.
    "Cryptodome.Cipher._mode_cbc",
    # cryptography loads its OpenSSL backend on first use by some x509 calls.
    "cryptography.hazmat.backends.openssl",
)

# ipykernel sets this backend when MPLBACKEND is unset, but matplotlib reads
# the variable when it is imported, which here is before any kernel starts.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


class ForkServerError(DrillError):
    """The fork server did not start a kernel; the caller starts one the usual way."""


class KernelForkServer:
    """The runner's handle on a fork server process."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._failed = False
        self._used = False

    @classmethod
    def start(cls, env: Mapping[str, str] | None = None) -> KernelForkServer | None:
        """Start a fork server, or return None where kernels cannot be forked.

        Args:
            env: the server's environment, this process's by default.
        """
        if not hasattr(os, "pidfd_open") or not hasattr(os, "fork"):
            return None

        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                # Its own session, so a Ctrl-C at the terminal reaches the
                # runner only, which then closes the server in order.
                start_new_session=True,
            )
        except OSError as exc:
            logger.warning("kernel fork server did not start (%s)", exc)
            return None
        return cls(process)

    def fork(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        modules: Sequence[str] = (),
    ) -> int:
        """Fork a kernel with ipykernel's command-line `argv` and return its pid.

        Raises:
            ForkServerError: the server exited, timed out or reported an
                error, now or at an earlier request.
        """
        if self._failed:
            raise ForkServerError("the fork server failed at an earlier request")
        try:
            return self._request_fork(argv, env, cwd, modules)
        except ForkServerError:
            # A server that timed out once would cost every later kernel the
            # same wait, so the rest of the run starts kernels the usual way.
            self._failed = True
            raise

    def _request_fork(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        modules: Sequence[str],
    ) -> int:
        request = {
            "argv": list(argv),
            "env": dict(env),
            "cwd": cwd,
            "modules": list(modules),
            # A server that reaches the fork after the runner gave up must
            # not fork: that kernel would bind the same connection files.
            "deadline": time.time() + REPLY_TIMEOUT_SECONDS,
        }
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None

        self._used = True
        try:
            stdin.write(json.dumps(request).encode() + b"\n")
            stdin.flush()
        except OSError as exc:
            raise ForkServerError(f"the fork server is not running ({exc})") from exc

        readable, _, _ = select.select([stdout], [], [], REPLY_TIMEOUT_SECONDS)
        if not readable:
            limit = REPLY_TIMEOUT_SECONDS
            raise ForkServerError(f"the fork server did not reply within {limit} s")
        line = stdout.readline()
        if not line:
            raise ForkServerError("the fork server exited")

        try:
            reply = json.loads(line)
            if "error" in reply:
                raise ForkServerError(f"the fork server did not fork: {reply['error']}")
            return int(reply["pid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ForkServerError(f"invalid reply from the fork server: {exc}") from exc

    def close(self) -> None:
        """Ask the server to exit and wait for it, killing it if it does not."""
        if not self._used:
            # Still importing, most likely, and with no kernel to wait for.
            self._process.kill()
        if self._process.stdin is not None:
            # A request left unsent in the buffer fails again on close.
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        try:
            self._process.wait(timeout=CLOSE_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("kernel fork server did not exit; killing it")
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


class ForkedKernelProcess:
    """The parts of `subprocess.Popen` that jupyter_client uses, for a forked kernel.

    The runner is not the kernel's parent, so it cannot reap the kernel or
    learn its exit status: an exited kernel polls as 0. `send_signal` goes
    through the pidfd, so it cannot reach another process that reuses the
    pid, but jupyter_client signals the kernel's process group by number
    first.
    """

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self._pidfd is not None:
            # A pidfd becomes readable when its process exits.
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            if readable:
                self._set_exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            if not readable:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            self._set_exited()
        return self.returncode or 0

    def send_signal(self, signum: int) -> None:
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _set_exited(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self.returncode = 0


class ForkedKernelProvisioner(LocalProvisioner):  # type: ignore[misc]
    """A local provisioner that requests the kernel process from a fork server.

    It falls back to the usual launch when the kernelspec's command is not
    this Python's ``-m ipykernel_launcher`` or the server fails.
    """

    def __init__(
        self,
        server: KernelForkServer,
        modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._server = server
        self._modules = list(modules)

    @classmethod
    def for_manager(
        cls, manager: Any, server: KernelForkServer, modules: Sequence[str]
    ) -> ForkedKernelProvisioner:
        """Return a provisioner for `manager`, which must not have started yet."""
        manager.kernel_id = manager.kernel_id or str(uuid.uuid4())
        return cls(
            server,
            modules,
            kernel_id=manager.kernel_id,
            kernel_spec=manager.kernel_spec,
            parent=manager,
        )

    async def launch_kernel(
        self, cmd: list[str], **kwargs: Any
    ) -> KernelConnectionInfo:
        argv = _ipykernel_argv(cmd)
        if argv is None:
            return await super().launch_kernel(cmd, **kwargs)

        env = kwargs.get("env") or os.environ
        cwd = str(kwargs.get("cwd") or Path.cwd())
        try:
            pid = self._server.fork(argv, env, cwd, self._modules)
            # jupyter_client calls only the Popen methods this class has.
            self.process = ForkedKernelProcess(pid)  # type: ignore[assignment]
        except (ForkServerError, OSError) as exc:
            logger.warning("starting the kernel without the fork server: %s", exc)
            return await super().launch_kernel(cmd, **kwargs)

        # The child called setsid, so its process group is its pid.
        self.pid = self.pgid = pid
        self.cwd = cwd
        return self.connection_info


def _ipykernel_argv(cmd: Sequence[str]) -> list[str] | None:
    """Return ipykernel's arguments from a kernel command this server can fork."""
    if len(cmd) < 3 or list(cmd[1:3]) != ["-m", "ipykernel_launcher"]:
        return None
    if os.path.realpath(cmd[0]) != os.path.realpath(sys.executable):
        return None
    return list(cmd[3:])


# The server side.


def serve(requests: IO[bytes], replies: IO[bytes]) -> dict[str, Any] | None:
    """Fork a kernel for each request until `requests` ends.

    Returns the request in a forked child, which must then become the
    kernel, and None in the server when the runner closes the pipe.
    """
    os.environ["JPY_PARENT_PID"] = str(os.getpid())
    os.environ.setdefault("MPLBACKEND", INLINE_BACKEND)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    _import_quietly(SERVER_MODULES)
    # Every drill's evidence header names the platform, and the first call
    # reads the Python binary to find the C library version.
    platform.platform()

    for line in requests:
        _reap_exited_kernels()
        request = json.loads(line)
        _import_quietly(request.get("modules", ()))
        if time.time() > request["deadline"]:
            _reply(
                replies, {"error": "the request expired while modules were imported"}
            )
            continue
        # Objects moved to the permanent generation are never scanned by the
        # kernels' garbage collections, which would otherwise copy every
        # shared page that contains one.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            _reply(replies, {"error": str(exc)})
            continue
        if pid == 0:
            # Closed, so that the runner reads end-of-file when the server exits.
            replies.close()
            return dict(request)
        _reply(replies, {"pid": pid})

    _reap_exited_kernels()
    return None


def run_kernel(request: Mapping[str, Any]) -> None:
    """Turn this forked child into the requested kernel and run it until it stops."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # ipykernel exits when this server, its parent, exits.
    os.environ["JPY_PARENT_PID"] = str(os.getppid())

    # The kernel must not read the requests; its standard output is already
    # the server's standard error.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    sys.argv = ["ipykernel_launcher", *request["argv"]]
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(argv=request["argv"])


def _import_quietly(modules: Sequence[str]) -> None:
    for name in modules:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except (Exception, SystemExit):  # not a module, or a broken one
            logger.debug("fork server did not import %s", name, exc_info=True)


def _reap_exited_kernels() -> None:
    # Reaping here, before the next fork, and not as kernels exit keeps each
    # pid unused until the runner has opened its pidfd, which it does before
    # it sends the next request.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reply(replies: IO[bytes], reply: Mapping[str, Any]) -> None:
    replies.write(json.dumps(reply).encode() + b"\n")
    replies.flush()


def main() -> None:
    # As ipykernel_launcher does, keep the working folder out of sys.path;
    # IPython adds '' back when the kernel starts.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]

    # Replies go to a copy of standard output, and standard output itself
    # becomes standard error, so that whatever an import prints cannot
    # corrupt a reply.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    request = serve(sys.stdin.buffer, replies)
    if request is not None:
        run_kernel(request)


if __name__ == "__main__":
    main()
