"""Drill kernels forked from the kernel fork server, and the usual start as fallback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from trekeys.kernel_forkserver import (
    ForkedKernelProcess,
    ForkedKernelProvisioner,
    KernelForkServer,
    _ipykernel_argv,
)
from trekeys.kernel_imports import runbook_imports
from trekeys.kernels import KernelStarter, kill_kernel

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the fork server needs pidfd_open (Linux)"
)


def run_code(starter: KernelStarter, manager, code: str) -> str:
    """Execute `code` in a started kernel and return what it printed."""
    client = manager.client()
    client.start_channels()
    printed: list[str] = []

    def keep_stream(message: dict) -> None:
        if message["msg_type"] == "stream":
            printed.append(message["content"]["text"])

    async def execute() -> None:
        await client.wait_for_ready(timeout=30)
        await client.execute_interactive(code, timeout=30, output_hook=keep_stream)

    try:
        asyncio.run_coroutine_threadsafe(execute(), starter._loop).result()
    finally:
        client.stop_channels()
    return "".join(printed)


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until_stopped(pid: int, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.1)
    return False


def write_runbook(path: Path, source: str) -> Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nbformat.write(notebook, path)
    return path


def test_forked_kernel_has_drill_env_and_folder(tmp_path: Path):
    runbook = write_runbook(tmp_path / "book.ipynb", "from trekeys import tls_chart")
    starter = KernelStarter()
    try:
        env = {**os.environ, "TREKEYS_TEST_MARK": "drill-7"}
        starter.start_next(env, tmp_path, runbook)
        manager = starter.take()

        assert isinstance(manager.provisioner, ForkedKernelProvisioner)
        assert isinstance(manager.provisioner.process, ForkedKernelProcess)
        printed = run_code(
            starter,
            manager,
            "import os, sys\n"
            "print(os.environ['TREKEYS_TEST_MARK'])\n"
            "print(os.getcwd())\n"
            "print(os.getsid(0) == os.getpid())\n"
            "print('trekeys.runbook' in sys.modules)\n"
            "print('matplotlib.figure' in sys.modules)\n"
            "print('tls_chart' in globals())\n",
        )
        mark, cwd, own_session, preloaded, nested_import, bound = printed.split()
        assert mark == "drill-7"
        assert Path(cwd) == tmp_path
        assert own_session == "True"
        assert preloaded == "True"
        assert nested_import == "True"  # tls_chart imports it inside a function
        assert bound == "False"  # preloading binds no name in the runbook
        starter.shutdown(manager)
    finally:
        starter.close()


def test_kernels_and_server_gone_after_close(tmp_path: Path):
    starter = KernelStarter()
    server_pid = starter._server._process.pid
    pids = []
    for _ in range(2):
        starter.start_next(dict(os.environ), tmp_path)
        manager = starter.take()
        pids.append(manager.provisioner.pid)
        starter.shutdown(manager)
    starter.start_next(dict(os.environ), tmp_path)  # started, never taken
    starter.close()

    assert len(set(pids)) == 2
    for pid in pids:
        assert wait_until_stopped(pid), f"kernel {pid} still runs"
    assert not is_running(server_pid)


def test_kernel_exits_when_server_dies(tmp_path: Path):
    starter = KernelStarter()
    try:
        starter.start_next(dict(os.environ), tmp_path)
        manager = starter.take()
        pid = manager.provisioner.pid
        starter._server._process.kill()

        # ipykernel polls its parent once a second.
        assert wait_until_stopped(pid), "kernel outlived its fork server"
        # The pidfd reports the exit once every thread of the kernel has ended.
        assert manager.provisioner.process.wait(timeout=10) == 0
        assert manager.provisioner.process.poll() == 0
        starter.shutdown(manager)
    finally:
        starter.close()


def test_kill_kernel_stops_forked_process_group(tmp_path: Path):
    starter = KernelStarter()
    try:
        starter.start_next(dict(os.environ), tmp_path)
        manager = starter.take()
        printed = run_code(
            starter,
            manager,
            "import subprocess\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "print(child.pid)",
        )
        sleeper = int(printed)

        kill_kernel(manager)

        assert wait_until_stopped(manager.provisioner.pid)
        assert wait_until_stopped(sleeper), "a tool the kernel started survived"
        starter.shutdown(manager)
    finally:
        starter.close()


def test_usual_start_when_server_is_gone(tmp_path: Path, caplog):
    starter = KernelStarter()
    try:
        starter._server._process.kill()
        starter._server._process.wait()

        starter.start_next(dict(os.environ), tmp_path)
        manager = starter.take()

        assert isinstance(manager.provisioner.process, subprocess.Popen)
        assert run_code(starter, manager, "print(6 * 7)").strip() == "42"
        assert "without the fork server" in caplog.text
        starter.shutdown(manager)
    finally:
        starter.close()


def test_server_exits_on_end_of_requests(tmp_path: Path):
    server = KernelForkServer.start()
    assert server is not None
    pid = server._process.pid
    # A kernel asked only for its version prints it and exits.
    kernel = server.fork(["--version"], dict(os.environ), str(tmp_path), ["json"])
    assert wait_until_stopped(kernel)
    started = time.monotonic()
    server.close()

    assert time.monotonic() - started < 5
    assert server._process.returncode == 0
    assert not is_running(pid)


def test_only_this_python_ipykernel_is_forked():
    assert _ipykernel_argv([sys.executable, "-m", "ipykernel_launcher", "-f", "c"]) == [
        "-f",
        "c",
    ]
    assert (
        _ipykernel_argv(["/usr/bin/other-python", "-m", "ipykernel_launcher"]) is None
    )
    assert _ipykernel_argv([sys.executable, "-m", "other_kernel", "-f", "c"]) is None
    assert _ipykernel_argv([sys.executable]) is None


def test_forked_process_signals_and_wait():
    child = subprocess.Popen(["sleep", "300"])
    try:
        process = ForkedKernelProcess(child.pid)
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)

        process.send_signal(signal.SIGTERM)
        child.wait(timeout=10)

        assert process.wait(timeout=5) == 0
        assert process.poll() == 0
        process.kill()  # the pidfd is closed; nothing is signalled
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_runbook_imports_follow_trekeys_modules(tmp_path: Path):
    path = write_runbook(
        tmp_path / "book.ipynb", "from trekeys import tls_chart\nimport this"
    )

    modules = runbook_imports(path)

    assert "trekeys.tls_chart" in modules
    assert "this" not in modules  # the runbook's own import happens in its cell
    # tls_chart imports matplotlib inside a function only.
    assert "matplotlib.figure" in modules
    assert "trekeys.tls_audit" in modules
    assert "trekeys.drills" not in modules


def test_runbook_imports_import_nothing(tmp_path: Path):
    path = write_runbook(tmp_path / "book.ipynb", "from trekeys import tls_audit")
    # A fresh interpreter, because this one has imported trekeys modules already.
    script = (
        "import sys\n"
        "from trekeys.kernel_imports import runbook_imports\n"
        "before = set(sys.modules)\n"
        f"found = runbook_imports({str(path)!r})\n"
        "print('trekeys.tls_audit' in found)\n"
        "print(sorted(m for m in set(sys.modules) - before if 'trekeys' in m))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )

    found, imported = result.stdout.splitlines()
    assert found == "True"
    assert imported == "[]"


def test_printing_import_leaves_replies_intact(tmp_path: Path):
    # Run in the server, a module that prints must not corrupt the reply pipe.
    (tmp_path / "noisy_module.py").write_text("print('imported, and noisy')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    server = KernelForkServer.start(env=env)
    assert server is not None
    try:
        kernel = server.fork(["--version"], env, str(tmp_path), ["noisy_module"])
        assert wait_until_stopped(kernel)
        kernel = server.fork(["--version"], env, str(tmp_path), [])
        assert wait_until_stopped(kernel)
    finally:
        server.close()


def test_exiting_import_spares_server(tmp_path: Path):
    (tmp_path / "exiting_module.py").write_text("raise SystemExit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    server = KernelForkServer.start(env=env)
    assert server is not None
    try:
        kernel = server.fork(["--version"], env, str(tmp_path), ["exiting_module"])
        assert wait_until_stopped(kernel)
        assert server._process.poll() is None
    finally:
        server.close()


def test_runbook_module_not_shared_with_next_drill(tmp_path: Path, monkeypatch):
    # A runbook's own module clears the umask when imported; the next drill
    # must not inherit that. The server could import the module too.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner_mask = os.umask(0o22)
    os.umask(runner_mask)
    assert runner_mask != 0
    (tmp_path / "umask_module.py").write_text("import os\nos.umask(0)\n")
    first = write_runbook(tmp_path / "first.ipynb", "import umask_module")
    env = dict(os.environ)
    starter = KernelStarter()
    try:
        starter.start_next(env, tmp_path, first)
        manager = starter.take()
        run_code(starter, manager, "import umask_module")
        starter.shutdown(manager)

        starter.start_next(env, tmp_path)
        manager = starter.take()
        printed = run_code(
            starter,
            manager,
            "import os, sys\n"
            "mask = os.umask(0)\n"
            "print(oct(mask), 'umask_module' in sys.modules)",
        )
        starter.shutdown(manager)
    finally:
        starter.close()

    mask, imported = printed.split()
    assert mask == oct(runner_mask)
    assert imported == "False"


def test_expired_request_forks_nothing(tmp_path: Path):
    # The runner stops waiting for a reply after a timeout. A request that the
    # server reaches later must not fork a kernel on the same connection files.
    server = KernelForkServer.start()
    assert server is not None
    request = {
        "argv": ["--version"],
        "env": dict(os.environ),
        "cwd": str(tmp_path),
        "modules": [],
        "deadline": time.time() - 1,
    }
    try:
        server._process.stdin.write(json.dumps(request).encode() + b"\n")
        server._process.stdin.flush()
        reply = json.loads(server._process.stdout.readline())
        children = Path(f"/proc/{server._process.pid}/task").glob("*/children")
        forked = [c.read_text().split() for c in children]
    finally:
        server.close()

    assert "expired" in reply["error"]
    assert "pid" not in reply
    assert forked == [[]]


def kernels_with_mark(mark: str) -> list[int]:
    """Return the pids of live processes whose environment contains `mark`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not is_running(int(entry.name)):
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"TREKEYS_TEST_MARK={mark}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def test_replaced_start_is_stopped(tmp_path: Path):
    starter = KernelStarter()
    try:
        starter.start_next({**os.environ, "TREKEYS_TEST_MARK": "replaced"}, tmp_path)
        starter.start_next({**os.environ, "TREKEYS_TEST_MARK": "taken"}, tmp_path)
        manager = starter.take()
        printed = run_code(
            starter, manager, "import os\nprint(os.environ['TREKEYS_TEST_MARK'])"
        )
        starter.shutdown(manager)
    finally:
        starter.close()

    assert printed.strip() == "taken"
    # Checked at once: a kernel left running would exit only about a second
    # after the fork server, when ipykernel notices its parent is gone.
    assert kernels_with_mark("replaced") == []
