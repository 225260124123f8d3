import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (loads a real ComfyUI and this pack once per session)
from comfy_server import running_server  # noqa: E402  (scripts/, on sys.path through harness)


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


@pytest.fixture(scope="session")
def server():
    with running_server(harness.COMFY_DIR, harness.REPO) as srv:
        yield srv
