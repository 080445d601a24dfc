"""Fixtures: an API server in front of the scripted fake controller (tests/tools/api_test_server),
started as a subprocess. ctest passes its path in MOE_API_TEST_SERVER; run by hand, the newest
build*/ directory's binary is used."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

SECRET = "python test secret"


def _server_binary() -> str:
    path = os.environ.get("MOE_API_TEST_SERVER")
    if path:
        return path
    found = glob.glob(str(ROOT / "build*" / "tests" / "unit" / "actors" / "moe_api_test_server"))
    if not found:
        pytest.skip("moe_api_test_server is not built (set MOE_API_TEST_SERVER)")
    return max(found, key=os.path.getmtime)


class Server:
    def __init__(self, *flags: str):
        self.proc = subprocess.Popen(
            [_server_binary(), "--secret", SECRET, *flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"api_test_server did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        # Closing stdin is the server's signal to drain and stop.
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = Server("--token-interval-ms", "2", "--fail-token", "777")
    yield s
    s.stop()


@pytest.fixture
def make_server():
    started = []

    def make(*flags: str) -> Server:
        started.append(Server(*flags))
        return started[-1]

    yield make
    for s in started:
        s.stop()
