"""A real ComfyUI server on 127.0.0.1 with this pack in its custom_nodes, and a client that waits on its events.

Used by the server and browser tests (tests/conftest.py) and the soak bench (bench/soak.py). Every wait is on an
event (the server answering, a websocket message, a history entry); ``HANG_CAP_S`` only guards against a hang,
so a slow or loaded machine never reaches it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HANG_CAP_S = float(os.environ.get("IDP_TEST_HANG_CAP_S", "1800"))
PACK_NAME = "idportrait"


def http_get(url: str, timeout: float = HANG_CAP_S):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def http_post(url: str, payload, timeout: float = HANG_CAP_S):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def wait_until(ready, what: str, poll_s: float = 0.05):
    """Poll ``ready()`` until it returns a truthy value (returned); HANG_CAP_S only guards against a hang."""
    start = time.monotonic()
    while True:
        got = ready()
        if got:
            return got
        if time.monotonic() - start > HANG_CAP_S:
            raise AssertionError(f"{what}: nothing after {HANG_CAP_S:.0f} s (a hang)")
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.5, 1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(comfy_dir: str, repo: str, base: str | None = None, python: str = sys.executable,
                   extra_args: tuple = ()):
    """Start ComfyUI (``comfy_dir``) with the pack (``repo``) linked into ``<base>/custom_nodes``; yields
    ``{"url", "base", "log", "pid"}`` once it answers, and stops it afterwards."""
    base = base or tempfile.mkdtemp(prefix="idp-server-")
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_NAME)
    if not os.path.lexists(link):
        os.symlink(repo, link)
    port = _free_port()
    log_path = os.path.join(base, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
         "--disable-api-nodes", "--disable-auto-launch", "--use-pytorch-cross-attention", *extra_args],
        cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})   # one-thread kernels, as the in-process test runs
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
        yield {"url": url, "base": base, "log": log_path, "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def history_entry(url: str, prompt_id: str):
    """The finished history entry of a prompt (None while it runs)."""
    hist = json.loads(http_get(url + f"/history/{prompt_id}")[1])
    entry = hist.get(prompt_id)
    return entry if entry and entry["status"].get("completed") is not None else None


TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


async def _queue_and_follow(url: str, prompt: dict, on_event=None):
    import aiohttp
    client_id = str(uuid.uuid4())
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws", 1) + f"/ws?clientId={client_id}") as ws:
            async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                answer = await r.json()
            if "prompt_id" not in answer:
                return answer, []
            pid, events = answer["prompt_id"], []
            while True:
                msg = await ws.receive(timeout=HANG_CAP_S)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(msg.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") not in (None, pid):
                        continue
                    events.append(event)
                    if on_event is not None:
                        await asyncio.get_running_loop().run_in_executor(None, on_event, event)
                    if data.get("prompt_id") == pid and event["type"] in TERMINAL:
                        return answer, events
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise AssertionError(f"the server closed the websocket: {msg}")
                # binary messages are previews


def run_over_http(url: str, prompt: dict, on_event=None):
    """Queue ``prompt`` as a client with a websocket and wait for its end there.

    ``on_event(event)`` sees each JSON message of this prompt as it arrives (e.g. to interrupt at the first
    progress message). Returns (the /prompt answer, the history entry, the messages in order).
    """
    answer, events = asyncio.run(_queue_and_follow(url, prompt, on_event))
    entry = None
    if "prompt_id" in answer:   # the history entry is stored right after the last message
        entry = wait_until(lambda: history_entry(url, answer["prompt_id"]), "history entry")
    return answer, entry, events
