"""moe_client's training calls (train, submit_training, wait_training, training_status,
cancel_training, checkpoint) against the API server in front of scripted training jobs
(tests/unit/actors/fake_training_jobs.hpp): the same behaviour as the C++ client
(tests/unit/actors/api_training_test.cpp)."""

import asyncio
import inspect
import math
import time

import capnp
import pytest

import moe_client
from conftest import SECRET, Server


def fake_loss(step):
    """The loss the fake reports after `step` (fake_training_jobs.hpp)."""
    return 5.0 / (1.0 + step)


CORPUS = [1 + i % 400 for i in range(256)]


@pytest.fixture(scope="module")
def server():
    s = Server("--training-step-interval-ms", "2")
    yield s
    s.stop()


def test_the_defaults_are_the_schemas():
    """submit_training's keyword defaults equal TrainingJob's default values in api.capnp."""
    unset = moe_client.client.api.TrainingJob.new_message()
    params = inspect.signature(moe_client.AsyncClient.submit_training).parameters
    for name, wire in moe_client.client._TRAINING_FIELDS.items():
        assert params[name].default == getattr(unset, wire), name


def test_train_streams_every_step_then_the_final_event(server):
    events = []
    with moe_client.Client(server.address, SECRET) as c:
        final = c.train(CORPUS, sequence_length=16, batch_sequences=2, steps=10,
                        learning_rate=0.02, on_event=events.append)
        assert c.training_status(final.job_id).state == "finished"
    assert final.state == "finished" and final.finished
    assert final.step == final.steps == 10
    assert final.loss == pytest.approx(fake_loss(10))
    assert final.learning_rate == pytest.approx(0.02)
    assert final.load_balance == pytest.approx([1.1, 1.5])
    assert events and events[-1].finished and events[-1].step == 10
    steps = [e.step for e in events]
    assert steps == sorted(set(steps)), "steps out of order or repeated"
    assert all(e.loss == pytest.approx(fake_loss(e.step)) for e in events)
    assert all(e.job_id == final.job_id for e in events)
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]


def test_a_slow_handler_gets_the_newest_event(server):
    steps = []

    def slow(e):
        steps.append(e.step)
        time.sleep(0.03)

    with moe_client.Client(server.address, SECRET) as c:
        final = c.train(CORPUS, sequence_length=16, steps=60, on_event=slow)
    assert final.step == 60 and steps[-1] == 60
    assert len(steps) < 30, "the server sent a backlog instead of the newest event"
    assert steps == sorted(set(steps))


def test_text_is_accepted_and_status_cancel_and_unknown_jobs_work(make_server):
    s = make_server("--training-step-interval-ms", "10")
    with moe_client.Client(s.address, SECRET) as c:
        job = c.submit_training("a text corpus, tokenised by the server into bytes " * 4,
                                sequence_length=16, steps=1000)
        st = c.training_status(job)
        assert st.state in ("queued", "running") and st.steps == 1000
        assert c.cancel_training(job) is True
        final = c.wait_training(job, timeout=20)
        assert final.state == "cancelled" and final.step < 1000
        assert c.cancel_training(job) is False
        with pytest.raises(moe_client.UnknownJob, match="no training job 424242"):
            c.training_status(424242)
        with pytest.raises(moe_client.UnknownJob):
            c.cancel_training(424242)
        with pytest.raises(moe_client.UnknownJob):
            c.wait_training(424242)


def test_a_failed_job_raises_job_failed_with_the_step(server):
    with moe_client.Client(server.address, SECRET) as c:
        with pytest.raises(moe_client.JobFailed, match="failed at step 1 of 5: scripted failure"):
            c.train([499] + CORPUS, sequence_length=16, steps=5)


def test_checkpoint(make_server):
    s = make_server("--training-step-interval-ms", "5")
    events = []
    with moe_client.Client(s.address, SECRET) as c:
        assert c.checkpoint("/checkpoints/idle") == "/checkpoints/idle"
        job = c.submit_training(CORPUS, sequence_length=16, steps=1000, on_event=events.append)
        deadline = time.monotonic() + 20
        while not events:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert c.checkpoint("/checkpoints/run") == "/checkpoints/run"
        while not any(e.checkpoint == "/checkpoints/run" for e in events):
            assert time.monotonic() < deadline, "no event carried the checkpoint"
            time.sleep(0.005)
        with pytest.raises(moe_client.ServerError, match="Permission denied"):
            c.checkpoint("/checkpoints/unwritable")
        for bad in ("", "relative/dir", "/nul\0byte"):
            with pytest.raises(moe_client.InvalidRequest, match="directory: "):
                c.checkpoint(bad)
        c.cancel_training(job)
        assert c.wait_training(job, timeout=20).state == "cancelled"


@pytest.mark.parametrize("corpus, kwargs, field", [
    ([], {}, "corpus.tokens: is empty"),
    ("", {}, "corpus.text: is empty"),
    (b"bytes", {}, "corpus: bytes"),
    ([1, -2] + CORPUS, {}, r"corpus.tokens\[1\]"),
    (CORPUS, dict(sequence_length=1), "sequenceLength"),
    (CORPUS, dict(sequence_length=300), "fewer than one sequence"),
    (CORPUS, dict(batch_sequences=0), "batchSequences"),
    (CORPUS, dict(steps=0), "steps"),
    (CORPUS, dict(steps=2.5), "steps"),
    (CORPUS, dict(warmup_steps=-1), "warmupSteps"),
    (CORPUS, dict(learning_rate=0.0), "learningRate"),
    (CORPUS, dict(learning_rate=float("nan")), "learningRate"),
    (CORPUS, dict(min_learning_rate=1.0), "minLearningRate"),
    (CORPUS, dict(beta1=1.0), "beta1"),
    (CORPUS, dict(beta2=-0.5), "beta2"),
    (CORPUS, dict(eps=0.0), "eps"),
    (CORPUS, dict(weight_decay=-1.0), "weightDecay"),
    (CORPUS, dict(grad_clip=math.inf), "gradClip"),
    (CORPUS, dict(balance_loss_weight=-1.0), "balanceLossWeight"),
    (CORPUS, dict(bias_update_speed=float("nan")), "biasUpdateSpeed"),
    (CORPUS, dict(seed=-1), "seed"),
])
def test_invalid_arguments_name_the_field(server, corpus, kwargs, field):
    with moe_client.Client(server.address, SECRET) as c:
        with pytest.raises(moe_client.InvalidRequest, match=field):
            c.submit_training(corpus, **{"sequence_length": 16, **kwargs})


def test_the_servers_refusals_come_back(server):
    """What only the model knows: its vocabulary (512 ids) and context (256) in the fake."""
    with moe_client.Client(server.address, SECRET) as c:
        with pytest.raises(moe_client.InvalidRequest, match="outside the vocabulary"):
            c.submit_training([600] + CORPUS, sequence_length=16)
        with pytest.raises(moe_client.InvalidRequest, match="exceeds the model's context"):
            c.submit_training(CORPUS * 2, sequence_length=300)
        with pytest.raises(moe_client.InvalidRequest, match="fewer than one sequence"):
            c.submit_training("short", sequence_length=16)


def test_a_raw_client_meets_the_servers_checks(server):
    async def main():
        async with capnp.kj_loop():
            host, port = moe_client.parse_address(server.address)
            stream = await capnp.AsyncIoStream.create_connection(host=host, port=port)
            rpc = capnp.TwoPartyClient(stream)
            gateway = rpc.bootstrap().cast_as(moe_client.client.api.Gateway)
            service = (await gateway.login(SECRET, moe_client.API_VERSION)).service
            job = moe_client.client.api.TrainingJob.new_message()
            job.corpus.tokens = CORPUS
            job.sequenceLength = 1
            with pytest.raises(capnp.KjException, match="invalid_request: sequenceLength"):
                await service.train(job=job)
            with pytest.raises(capnp.KjException, match="invalid_request: directory"):
                await service.checkpoint("relative")
            spec = moe_client.client.api.JobSpec.new_message()
            spec.init("training")
            with pytest.raises(capnp.KjException, match=r"JobService\.train\(\)"):
                await service.submit(job=spec)
            rpc.close()

    asyncio.run(main())


def test_training_is_unavailable_when_the_server_does_not_train(make_server):
    s = make_server("--training", "0")
    with moe_client.Client(s.address, SECRET) as c:
        for call in (lambda: c.submit_training(CORPUS, sequence_length=16),
                     lambda: c.training_status(1), lambda: c.cancel_training(1),
                     lambda: c.checkpoint("/tmp/x")):
            with pytest.raises(moe_client.Unavailable, match="training is not enabled") as info:
                call()
            assert info.value.retryable
        assert c.describe().name == "fake"


def test_a_client_that_disconnects_mid_stream_gets_its_training_job_cancelled(make_server):
    s = make_server("--training-step-interval-ms", "10")
    seen = []
    c = moe_client.Client(s.address, SECRET)
    job = c.submit_training(CORPUS, sequence_length=16, steps=1000, on_event=seen.append)
    deadline = time.monotonic() + 20
    while not seen:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    c.close()
    with moe_client.Client(s.address, SECRET) as watcher:
        while watcher.training_status(job).state != "cancelled":
            assert time.monotonic() < deadline, "the training job of a vanished client kept running"
            time.sleep(0.02)


def test_the_async_client_trains(server):
    async def main():
        async with capnp.kj_loop():
            c = await moe_client.AsyncClient.connect(server.address, SECRET)
            finals = await asyncio.gather(
                *(c.train(CORPUS, sequence_length=16, steps=3, seed=i) for i in range(3)))
            assert [f.step for f in finals] == [3, 3, 3]
            assert len({f.job_id for f in finals}) == 3
            await c.close()

    asyncio.run(main())
