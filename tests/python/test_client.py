"""moe_client (python/) against a running API server with a scripted controller: the same
calls and the same failures as the C++ client (tests/unit/actors/api_server_test.cpp)."""

import asyncio
import time
from pathlib import Path

import capnp
import pytest

import moe_client
from conftest import ROOT, SECRET


def fake_tokens(prompt, n, stop=()):
    """What the fake controller generates (tests/unit/actors/fake_controller.hpp)."""
    out = []
    for i in range(n):
        t = (prompt[-1] + 1 + i) % 50000
        out.append(t)
        if t in stop:
            break
    return out


def test_the_packaged_schema_is_protocol_api_capnp():
    shipped = Path(moe_client.__file__).with_name("api.capnp").read_bytes()
    assert shipped == (ROOT / "protocol" / "api.capnp").read_bytes(), (
        "python/moe_client/api.capnp differs from protocol/api.capnp: copy it over")


def test_generate_returns_the_tokens(server):
    with moe_client.Client(server.address, SECRET) as c:
        assert c.server_version == moe_client.API_VERSION
        assert c.generate([5, 17, 42], 8) == fake_tokens([5, 17, 42], 8)
        assert c.generate([10], 20, stop_ids=[14]) == [11, 12, 13, 14]
        assert c.generate([10], 0) == []


def test_submit_streams_every_token_in_order(server):
    events = []
    with moe_client.Client(server.address, SECRET) as c:
        job = c.submit([1, 2, 3], 30, temperature=0.5, top_k=7, top_p=0.9, seed=3,
                       on_event=events.append)
        final = c.wait(job, timeout=20)
    assert final.state == "finished" and final.finish_reason == "length"
    assert final.tokens == fake_tokens([3], 30)
    assert [t for e in events for t in e.tokens] == final.tokens
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert all(e.job_id == job for e in events)


def test_status_cancel_and_unknown_jobs(server):
    with moe_client.Client(server.address, SECRET) as c:
        job = c.submit([1], 4000)
        assert c.status(job).state in ("queued", "running")
        assert c.cancel(job) is True
        final = c.wait(job, timeout=20)
        assert final.state == "cancelled" and final.finish_reason == "cancelled"
        assert c.cancel(job) is False
        assert c.status(job).state == "cancelled"
        with pytest.raises(moe_client.UnknownJob, match="no job 424242"):
            c.status(424242)
        with pytest.raises(moe_client.UnknownJob):
            c.wait(424242)


def test_describe(server):
    with moe_client.Client(server.address, SECRET) as c:
        d = c.describe()
    assert d.name == "fake"
    assert d.nodes == [moe_client.Node("n0", "127.0.0.1", ["n0/cpu0"])]
    assert d.actors[0].kind == "controller"
    assert d.placement_version == 1 and d.placement_json == "{}"


def test_a_failed_job_raises_job_failed(server):
    with moe_client.Client(server.address, SECRET) as c:
        with pytest.raises(moe_client.JobFailed, match="scripted failure"):
            c.generate([777, 1], 5)


def test_a_wrong_secret_is_unauthenticated_and_never_echoed(server):
    wrong = "definitely wrong"
    with pytest.raises(moe_client.Unauthenticated) as info:
        moe_client.Client(server.address, wrong)
    assert wrong not in str(info.value) and SECRET not in str(info.value)
    with pytest.raises(moe_client.Unauthenticated):
        moe_client.Client(server.address, "")


def test_the_secret_may_come_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("MOE_CLUSTER_SECRET", SECRET)
    with moe_client.Client(server.address) as c:
        assert c.generate([1], 2) == [2, 3]


def test_connection_failures_are_named():
    with pytest.raises(moe_client.ConnectionFailed, match="refused"):
        moe_client.Client("127.0.0.1:1", SECRET)
    with pytest.raises(moe_client.InvalidRequest):
        moe_client.Client("no-port", SECRET)
    assert moe_client.parse_address("[::1]:7101") == ("::1", 7101)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt_ids=[]), "prompt"),
    (dict(prompt_ids=[1, -2]), r"prompt\[1\]"),
    (dict(prompt_ids=[2**31]), r"prompt\[0\]"),
    (dict(prompt_ids=["x"]), r"prompt\[0\]"),
    (dict(max_new_tokens=-1), "maxNewTokens"),
    (dict(top_p=0.0), "topP"),
    (dict(top_p=1.5), "topP"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(stop_ids=[-3]), r"stopTokenIds\[0\]"),
])
def test_invalid_arguments_name_the_field(server, kwargs, field):
    args = dict(prompt_ids=[1], max_new_tokens=4)
    args.update(kwargs)
    with moe_client.Client(server.address, SECRET) as c:
        with pytest.raises(moe_client.InvalidRequest, match=field):
            c.submit(**args)


def test_the_server_refuses_what_the_client_would_not_send(server):
    """A raw pycapnp caller skipping moe_client's checks meets the server's."""

    async def main():
        async with capnp.kj_loop():
            host, port = moe_client.parse_address(server.address)
            stream = await capnp.AsyncIoStream.create_connection(host=host, port=port)
            rpc = capnp.TwoPartyClient(stream)
            gateway = rpc.bootstrap().cast_as(moe_client.client.api.Gateway)
            with pytest.raises(capnp.KjException, match="unsupported_version"):
                await gateway.login(SECRET, moe_client.API_VERSION + 1)
            service = (await gateway.login(SECRET, moe_client.API_VERSION)).service
            spec = moe_client.client.api.JobSpec.new_message()
            spec.init("generation").maxNewTokens = 3
            with pytest.raises(capnp.KjException, match="invalid_request: prompt: is empty"):
                await service.submit(job=spec)
            spec = moe_client.client.api.JobSpec.new_message()
            spec.init("training")
            with pytest.raises(capnp.KjException, match="invalid_request: training"):
                await service.submit(job=spec)
            rpc.close()

    asyncio.run(main())


def test_overloaded_is_retryable(make_server):
    s = make_server("--max-active", "1", "--token-interval-ms", "20")
    with moe_client.Client(s.address, SECRET) as c:
        first = c.submit([1], 4000)
        with pytest.raises(moe_client.Overloaded, match="overloaded: the queue is full") as info:
            c.submit([2], 4)
        assert info.value.retryable
        c.cancel(first)
        c.wait(first, timeout=20)
        assert c.generate([2], 3) == [3, 4, 5]


def test_a_client_that_disconnects_mid_stream_gets_its_job_cancelled(make_server):
    s = make_server("--token-interval-ms", "20")
    seen = []
    c = moe_client.Client(s.address, SECRET)
    job = c.submit([1], 4000, on_event=seen.append)
    deadline = time.monotonic() + 20
    while not seen:  # until the job is streaming
        with pytest.raises(moe_client.TimedOut):
            c.wait(job, timeout=0.02)
        assert time.monotonic() < deadline
    c.close()
    with moe_client.Client(s.address, SECRET) as watcher:
        deadline = time.monotonic() + 20
        while watcher.status(job).state != "cancelled":
            assert time.monotonic() < deadline, "the job of a vanished client kept running"
            time.sleep(0.02)


def test_a_raising_handler_fails_the_job_which_the_server_cancels(server):
    def handler(event):
        raise ValueError("handler bug")

    with moe_client.Client(server.address, SECRET) as c:
        job = c.submit([1], 4000, on_event=handler)
        final = c.wait(job, timeout=20)
        assert final.state == "failed" and "handler bug" in final.error
        deadline = time.monotonic() + 20
        while c.status(job).state != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_the_async_client(server):
    async def main():
        async with capnp.kj_loop():
            c = await moe_client.AsyncClient.connect(server.address, SECRET)
            tokens = await asyncio.gather(*(c.generate([i * 10], 5) for i in range(1, 5)))
            assert tokens == [fake_tokens([i * 10], 5) for i in range(1, 5)]
            assert (await c.describe()).name == "fake"
            await c.close()

    asyncio.run(main())


def test_a_stopping_server_ends_the_wait(make_server):
    s = make_server("--token-interval-ms", "20")
    c = moe_client.Client(s.address, SECRET)
    job = c.submit([1], 4000)
    s.stop()  # drains: cancels the job, delivers its last event, closes the connection
    try:
        assert c.wait(job, timeout=20).state == "cancelled"
    except moe_client.Disconnected:
        pass
    with pytest.raises(moe_client.Disconnected):
        c.status(job)
    c.close()
