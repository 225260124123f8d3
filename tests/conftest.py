import os
import socket
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (loads a real ComfyUI and this pack once per session)
from helpers import http_get, wait_until  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite. Tiny models run faster on one thread, and on a shared 2-core
    machine OpenMP spin-waiting of several threads per process can slow the tests down by an order of magnitude
    (results do not depend on it: every comparison is between runs of the same process)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    base = tempfile.mkdtemp(prefix="idp-server-")
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(harness.REPO, os.path.join(base, "custom_nodes", harness.PACK_NAME))
    port = _free_port()
    log_path = os.path.join(base, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
         "--disable-api-nodes", "--disable-auto-launch", "--use-pytorch-cross-attention"],
        cwd=harness.COMFY_DIR, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})   # the same one-thread kernels as the in-process runs (one_thread)
    url = f"http://127.0.0.1:{port}"
    try:
        def answering():
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI server exited:\n" + open(log_path).read()[-4000:])
            try:
                return http_get(url + "/system_stats", timeout=5)[0] == 200
            except OSError:
                return False
        wait_until(answering, "ComfyUI server start")
        yield {"url": url, "base": base, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


