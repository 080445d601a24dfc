"""Python client of the moe-runtime job-submission API (protocol/api.capnp), on pycapnp 2.x.

`AsyncClient` is the asyncio API (pycapnp 2.x runs Cap'n Proto RPC on asyncio: every call must
happen inside ``async with capnp.kj_loop():``). `Client` wraps it for synchronous code: it owns
a private thread running an asyncio loop with the kj loop open, and forwards each call there.

Errors: every failure raises a subclass of `MoeError` named after its cause, mirroring the C++
client's client_errc. The server reports its own as exceptions whose description starts with a
stable code ("overloaded: ..."), parsed here.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

import capnp

# pycapnp 2.x runs RPC on asyncio (capnp.kj_loop, AsyncIoStream); 1.x had its own event loop
# and a different async API, which this module does not speak.
if int(getattr(capnp, "__version__", "0").split(".")[0]) < 2:
    raise ImportError(f"moe_client needs pycapnp >= 2.0, found {capnp.__version__}")

# The schema ships inside the package (a copy of protocol/api.capnp, checked by the tests).
# "/capnp/c++.capnp", which it imports, ships with pycapnp.
_SCHEMA_PATH = Path(__file__).with_name("api.capnp")
api = capnp.load(str(_SCHEMA_PATH), imports=[str(Path(capnp.__file__).resolve().parent.parent)])

API_VERSION: int = api.apiVersion
INT32_MAX = 2**31 - 1


# --- errors ---------------------------------------------------------------------------------


class MoeError(Exception):
    """A failed call. `code` is the cause's name; `retryable` says whether a retry may help."""

    code = "server_error"
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConnectionFailed(MoeError):
    code, retryable = "connection_failed", True


class Disconnected(MoeError):
    code, retryable = "disconnected", True


class Unauthenticated(MoeError):
    code = "unauthenticated"


class UnsupportedVersion(MoeError):
    code = "unsupported_version"


class InvalidRequest(MoeError):
    code = "invalid_request"


class Overloaded(MoeError):
    code, retryable = "overloaded", True


class UnknownJob(MoeError):
    code = "unknown_job"


class Unavailable(MoeError):
    code, retryable = "unavailable", True


class TimedOut(MoeError):
    code, retryable = "timed_out", True


class JobFailed(MoeError):
    code = "job_failed"


class JobCancelled(MoeError):
    code = "job_cancelled"


class ServerError(MoeError):
    code = "server_error"


class TlsFailed(MoeError):
    """The TLS handshake failed: an untrusted or misnamed server certificate, a server without
    TLS, a refused or missing client certificate (the message says which)."""

    code = "tls_failed"


# The server's codes (api_errc in protocol/api_types.hpp) and the error each becomes.
_SERVER_CODES = {
    "unauthenticated": Unauthenticated,
    "unsupported_version": UnsupportedVersion,
    "invalid_request": InvalidRequest,
    "overloaded": Overloaded,
    "unknown_job": UnknownJob,
    "unavailable": Unavailable,
    "internal": ServerError,
}


def _from_kj(e: Exception, what: str) -> MoeError:
    """A pycapnp exception as the MoeError naming its cause."""
    description = getattr(e, "description", None) or str(e)
    text = description
    prefix = "remote exception: "
    if text.startswith(prefix):
        text = text[len(prefix):]
    code, sep, rest = text.partition(": ")
    if sep and code in _SERVER_CODES:
        return _SERVER_CODES[code](f"{code}: {rest}")
    kind = str(getattr(e, "type", ""))
    if kind == "DISCONNECTED":
        return Disconnected(f"{what}: connection lost: {text}")
    if kind == "OVERLOADED":
        return Overloaded(f"{what}: overloaded: {text}")
    return ServerError(f"{what}: {text}")


# --- TLS ------------------------------------------------------------------------------------


def _ssl_context(tls, ca_file, cert_file, key_file) -> Optional[ssl.SSLContext]:
    """The TLS context of connect()'s options; None: plain TCP. An SSLContext given as `tls`
    is used as it is."""
    if isinstance(tls, ssl.SSLContext):
        return tls
    if not (tls or ca_file or cert_file or key_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise InvalidRequest("invalid_request: cert_file and key_file go together: give both or neither")
    try:
        # With a CA file only its CAs are trusted; without one, the system's.
        context = ssl.create_default_context(cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise InvalidRequest(f"invalid_request: TLS: {e}") from None
    return context


def _explain_tls(text: str, server_name: str) -> str:
    """A failed handshake's text with its likely cause first (as the C++ client says it)."""
    low = text.lower()

    def has(*needles):
        return any(n in low for n in needles)

    if has("hostname mismatch", "ip address mismatch"):
        why = (f"the server's certificate does not name '{server_name}' (dial a name it holds or "
               "give server_name)")
    elif has("certificate verify failed", "not trusted"):
        why = "the server's certificate is not signed by a CA this client trusts (ca_file)"
    elif has("wrong version number", "packet length too long", "record layer", "http request",
             "unexpected eof"):
        why = "the server does not speak TLS on this port (no api.tls in its config?)"
    elif has("certificate required", "did not return a certificate"):
        why = ("the server asks for a client certificate (api.tls.client_ca_file): give cert_file "
               "and key_file")
    elif has("unknown ca", "bad certificate", "certificate unknown", "decrypt error"):
        why = "the server refused this client's certificate (not signed by its client_ca_file?)"
    else:
        return text
    return f"{why}: {text}"


# --- values ---------------------------------------------------------------------------------


@dataclass
class JobEvent:
    """One step of a job's stream: the tokens new since the previous event."""

    job_id: int
    tokens: List[int]
    finished: bool
    state: str  # "queued", "running", "finished", "cancelled", "failed"
    finish_reason: str = ""
    error: str = ""


@dataclass
class JobStatus:
    job_id: int
    state: str
    tokens: List[int] = field(default_factory=list)  # every token generated so far
    finish_reason: str = ""
    error: str = ""
    shard: int = -1


@dataclass
class Node:
    name: str
    host: str
    devices: List[str]


@dataclass
class ActorInfo:
    kind: str
    id: str
    node: str
    device: str


@dataclass
class ClusterDescription:
    name: str
    nodes: List[Node]
    actors: List[ActorInfo]
    placement_version: int
    placement_json: str


@dataclass
class TrainingEvent:
    """A training job's progress: after every step, and once more when it ends (finished)."""

    job_id: int
    step: int  # steps done
    steps: int  # steps asked for
    loss: float  # the last step's mean next-token cross-entropy
    learning_rate: float  # the last step's
    grad_norm: float  # the last step's global gradient norm, before clipping
    tokens_per_second: float  # since the job started
    load_balance: List[float]  # the last step's max / mean expert load per MoE layer
    finished: bool
    state: str  # "queued", "running", "finished", "cancelled", "failed"
    error: str = ""  # set when state == "failed"
    checkpoint: str = ""  # set on the event after a checkpoint was written there
    rollbacks: int = 0  # node failures survived by rolling back to a snapshot (step went back)


def _event(r) -> JobEvent:
    return JobEvent(r.jobId, list(r.tokens), r.finished, str(r.state), r.finishReason, r.error)


def _status(r) -> JobStatus:
    return JobStatus(r.jobId, str(r.state), list(r.tokens), r.finishReason, r.error, r.shard)


def _training_event(r) -> TrainingEvent:
    return TrainingEvent(r.jobId, r.step, r.steps, r.loss, r.learningRate, r.gradNorm,
                         r.tokensPerSecond, list(r.loadBalance), r.finished, str(r.state),
                         r.error, r.checkpoint, r.rollbacks)


def _cluster(r) -> ClusterDescription:
    return ClusterDescription(
        r.name,
        [Node(n.name, n.host, list(n.devices)) for n in r.nodes],
        [ActorInfo(a.kind, a.id, a.node, a.device) for a in r.actors],
        r.placementVersion,
        r.placementJson,
    )


def parse_address(address: str):
    """"host:port" or "[::1]:port" -> (host, port); InvalidRequest when malformed."""
    host, sep, port = address.rpartition(":")
    bad = InvalidRequest(f"address '{address}' is not HOST:PORT (e.g. 127.0.0.1:7101)")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad
    if ":" in host:
        if not (host.startswith("[") and host.endswith("]")):
            raise bad
        host = host[1:-1]
    return host, int(port)


def _check_ids(ids, name: str) -> List[int]:
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidRequest(f"invalid_request: {name}[{i}]: {t!r} is not an integer token id")
        if t < 0:
            raise InvalidRequest(f"invalid_request: {name}[{i}]: token id {t} is negative")
        if t > INT32_MAX:
            raise InvalidRequest(f"invalid_request: {name}[{i}]: token id {t} exceeds Int32")
        out.append(t)
    return out


def _generation_spec(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                     deadline_ms=0):
    """The checks the server makes (protocol::validate), made before anything is sent."""
    prompt = _check_ids(prompt_ids, "prompt")
    if not prompt:
        raise InvalidRequest("invalid_request: prompt: is empty")
    if not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens < 2**63:
        raise InvalidRequest(f"invalid_request: maxNewTokens: {max_new_tokens!r} is not >= 0")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest(f"invalid_request: temperature: {temperature} is not a finite number >= 0")
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"invalid_request: topP: {top_p} is not in (0, 1]")
    if not isinstance(top_k, int) or not 0 <= top_k < 2**32:
        raise InvalidRequest(f"invalid_request: topK: {top_k!r} is not in [0, 2^32)")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidRequest(f"invalid_request: seed: {seed!r} is not in [0, 2^64)")
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int) or not 0 <= deadline_ms < 2**64:
        raise InvalidRequest(f"invalid_request: deadlineMs: {deadline_ms!r} is not in [0, 2^64)")
    spec = api.JobSpec.new_message()
    g = spec.init("generation")
    g.prompt = prompt
    g.maxNewTokens = max_new_tokens
    g.temperature = float(temperature)
    g.topK = top_k
    g.topP = float(top_p)
    g.seed = seed
    g.stopTokenIds = _check_ids(stop_ids, "stopTokenIds")
    g.deadlineMs = deadline_ms
    return spec


# The training job's options: Python name -> schema field (TrainingJob in api.capnp). Their
# defaults here are the schema's (tests/python checks it).
_TRAINING_FIELDS = {
    "sequence_length": "sequenceLength",
    "batch_sequences": "batchSequences",
    "steps": "steps",
    "learning_rate": "learningRate",
    "warmup_steps": "warmupSteps",
    "min_learning_rate": "minLearningRate",
    "beta1": "beta1",
    "beta2": "beta2",
    "eps": "eps",
    "weight_decay": "weightDecay",
    "grad_clip": "gradClip",
    "balance_loss_weight": "balanceLossWeight",
    "bias_update_speed": "biasUpdateSpeed",
    "seed": "seed",
}

INT64_MAX = 2**63 - 1


def _training_spec(corpus, options):
    """The checks the server makes (protocol::validate for api_training_spec), made before
    anything is sent; answers the TrainingJob message."""

    def bad(text):
        return InvalidRequest(f"invalid_request: {text}")

    job = api.TrainingJob.new_message()
    if isinstance(corpus, str):
        if not corpus:
            raise bad("corpus.text: is empty")
        job.corpus.text = corpus
        num_tokens = None  # known once the server tokenised it
    elif isinstance(corpus, (bytes, bytearray)):
        raise bad("corpus: bytes are neither text (str) nor token ids; decode them first")
    else:
        tokens = _check_ids(corpus, "corpus.tokens")
        if not tokens:
            raise bad("corpus.tokens: is empty")
        job.corpus.tokens = tokens
        num_tokens = len(tokens)
    o = dict(options)
    for name in ("sequence_length", "batch_sequences", "steps", "warmup_steps", "seed"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(f"{_TRAINING_FIELDS[name]}: {v!r} is not an integer")
    for name, low in (("sequence_length", 2), ("batch_sequences", 1), ("steps", 1), ("warmup_steps", 0)):
        if not low <= o[name] <= INT64_MAX:
            raise bad(f"{_TRAINING_FIELDS[name]}: {o[name]} is below {low}" if o[name] < low
                      else f"{_TRAINING_FIELDS[name]}: {o[name]} exceeds Int64")
    if not 0 <= o["seed"] < 2**64:
        raise bad(f"seed: {o['seed']} is not in [0, 2^64)")
    if num_tokens is not None and num_tokens < o["sequence_length"]:
        raise bad(f"corpus.tokens: {num_tokens} tokens are fewer than one sequence of "
                  f"sequenceLength {o['sequence_length']}")
    for name in ("learning_rate", "min_learning_rate", "beta1", "beta2", "eps", "weight_decay",
                 "grad_clip", "balance_loss_weight", "bias_update_speed"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"{_TRAINING_FIELDS[name]}: {v!r} is not a number")
        o[name] = float(v)
    lr = o["learning_rate"]
    if not (math.isfinite(lr) and lr > 0):
        raise bad(f"learningRate: {lr} is not a finite number > 0")
    if not (math.isfinite(o["min_learning_rate"]) and 0 <= o["min_learning_rate"] <= lr):
        raise bad(f"minLearningRate: {o['min_learning_rate']} is not in [0, learningRate = {lr}]")
    for name in ("beta1", "beta2"):
        if not 0 <= o[name] < 1:
            raise bad(f"{name}: {o[name]} is not in [0, 1)")
    if not (math.isfinite(o["eps"]) and o["eps"] > 0):
        raise bad(f"eps: {o['eps']} is not a finite number > 0")
    if not math.isfinite(o["grad_clip"]):
        raise bad(f"gradClip: {o['grad_clip']} is not finite (<= 0 turns clipping off)")
    for name in ("weight_decay", "balance_loss_weight", "bias_update_speed"):
        if not (math.isfinite(o[name]) and o[name] >= 0):
            raise bad(f"{_TRAINING_FIELDS[name]}: {o[name]} is not a finite number >= 0")
    for name, wire in _TRAINING_FIELDS.items():
        setattr(job, wire, o[name])
    return job


def _check_directory(directory) -> str:
    if not isinstance(directory, str) or not directory:
        raise InvalidRequest("invalid_request: directory: is empty")
    if "\0" in directory:
        raise InvalidRequest("invalid_request: directory: contains a NUL byte")
    if not directory.startswith("/"):
        raise InvalidRequest(f"invalid_request: directory: '{directory}' is not an absolute path "
                             "(it names a directory on the server's file system)")
    return directory


# --- asyncio --------------------------------------------------------------------------------


class _Job:
    """What arrived for one submitted job (confined to the client's event loop)."""

    def __init__(self, on_event: Optional[Callable[[JobEvent], None]]):
        self.on_event = on_event
        self.tokens: List[int] = []
        self.final: Optional[JobStatus] = None
        self.done = asyncio.get_running_loop().create_future()


class _Sink(api.TokenSink.Server):
    def __init__(self, job: _Job):
        self._job = job

    async def event(self, event, _context, **kwargs):
        job = self._job
        if job.final is not None:
            return
        e = _event(event)
        job.tokens.extend(e.tokens)
        failure = None
        if job.on_event is not None:
            try:
                job.on_event(e)
            except Exception as ex:  # a handler bug fails this job, not the connection
                failure = f"the on_event handler raised {ex!r}"
        if failure is not None:
            e.finished, e.state, e.finish_reason, e.error = True, "failed", "error", failure
        if e.finished:
            job.final = JobStatus(e.job_id, e.state, list(job.tokens), e.finish_reason, e.error)
            if not job.done.done():
                job.done.set_result(None)
        if failure is not None:
            # Failing the call tells the server nobody reads this job any more: it cancels it.
            raise RuntimeError("moe client: the on_event handler failed")


class _TrainingJob:
    """What arrived for one training job (confined to the client's event loop)."""

    def __init__(self, on_event: Optional[Callable[[TrainingEvent], None]]):
        self.on_event = on_event
        self.final: Optional[TrainingEvent] = None
        self.done = asyncio.get_running_loop().create_future()


class _TrainingSink(api.TrainingSink.Server):
    def __init__(self, job: _TrainingJob):
        self._job = job

    async def event(self, event, _context, **kwargs):
        job = self._job
        if job.final is not None:
            return
        e = _training_event(event)
        failure = None
        if job.on_event is not None:
            try:
                job.on_event(e)
            except Exception as ex:  # a handler bug fails this job, not the connection
                failure = f"the on_event handler raised {ex!r}"
        if failure is not None:
            e.finished, e.state, e.error = True, "failed", failure
        if e.finished:
            job.final = e
            if not job.done.done():
                job.done.set_result(None)
        if failure is not None:
            # Failing the call tells the server nobody reads this job any more: it cancels it.
            raise RuntimeError("moe client: the on_event handler failed")


class AsyncClient:
    """The API as coroutines. Use inside ``async with capnp.kj_loop():``, on one event loop."""

    def __init__(self, rpc, stream, service, server_version: int, call_timeout: Optional[float]):
        self._rpc = rpc
        self._stream = stream
        self._service = service
        self._jobs = {}
        self._training_jobs = {}
        self._disconnected = asyncio.ensure_future(rpc.on_disconnect())
        self.server_version = server_version
        self.call_timeout = call_timeout

    @classmethod
    async def connect(cls, address: str, secret: str, *, connect_timeout: float = 10.0,
                      call_timeout: Optional[float] = 60.0,
                      tls: Union[bool, ssl.SSLContext] = False, ca_file: Optional[str] = None,
                      cert_file: Optional[str] = None, key_file: Optional[str] = None,
                      server_name: Optional[str] = None) -> "AsyncClient":
        """Connects and logs in with the cluster secret.

        TLS (a server with api.tls): `ca_file` is the PEM file of the CA that signed the
        server's certificate (without it, `tls=True` trusts the system's CAs); the certificate
        must name `server_name` (default: the host of `address`; an IP address is checked
        against the certificate's IP entries). `cert_file`/`key_file`: this client's
        certificate, for a server that asks for one (api.tls.client_ca_file). `tls` may also be
        a ready ssl.SSLContext. Any of these turns TLS on. Raises ConnectionFailed, TlsFailed,
        Unauthenticated, UnsupportedVersion, TimedOut, InvalidRequest (unusable TLS files).
        """
        host, port = parse_address(address)
        context = _ssl_context(tls, ca_file, cert_file, key_file)
        name = server_name or host
        extra = {"ssl": context, "server_hostname": name} if context is not None else {}
        try:
            stream = await asyncio.wait_for(
                capnp.AsyncIoStream.create_connection(host=host, port=port, **extra), connect_timeout)
        except asyncio.TimeoutError:
            what = "TLS handshake with" if context is not None else "cannot connect to"
            raise (TlsFailed if context is not None else ConnectionFailed)(
                f"{what} {address}: no answer within {connect_timeout} s") from None
        except ssl.SSLCertVerificationError as e:
            text = f"certificate verify failed: {e.verify_message}" if e.verify_message else str(e)
            raise TlsFailed(f"TLS handshake with {address} failed: {_explain_tls(text, name)}") from None
        except ssl.SSLError as e:
            raise TlsFailed(f"TLS handshake with {address} failed: {_explain_tls(str(e), name)}") from None
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            if context is not None and isinstance(e, ConnectionResetError):
                raise TlsFailed(f"TLS handshake with {address} failed: {_explain_tls(reason, name)}") from None
            raise ConnectionFailed(f"cannot connect to {address}: {reason}") from None
        rpc = capnp.TwoPartyClient(stream)
        gateway = rpc.bootstrap().cast_as(api.Gateway)
        try:
            login = await asyncio.wait_for(gateway.login(secret, API_VERSION), call_timeout)
        except asyncio.TimeoutError:
            rpc.close()
            raise TimedOut(f"login to {address}: no answer within {call_timeout} s") from None
        except capnp.KjException as e:
            rpc.close()
            err = _from_kj(e, f"login to {address}")
            if isinstance(err, (Disconnected, ServerError)):
                if context is not None:
                    # With TLS 1.3 the server checks a client certificate after the client's
                    # handshake: its refusal shows only now, as its alert or as a bare drop.
                    why = _explain_tls(err.message, name)
                    if why == err.message:
                        why = ("the server dropped the TLS session before answering login (does it "
                               "ask for a client certificate, api.tls.client_ca_file? then give "
                               f"cert_file and key_file signed by that CA): {err.message}")
                    raise TlsFailed(f"TLS session with {address} failed: {why}") from None
                raise ConnectionFailed(
                    f"cannot log in to {address}: {err} (a server with api.tls drops plain "
                    "connections so: connect with TLS, e.g. ca_file=...)") from None
            raise err from None
        return cls(rpc, stream, login.service, login.serverVersion, call_timeout)

    async def _call(self, what: str, request, timeout: Optional[float] = ...):
        try:
            return await asyncio.wait_for(request, self.call_timeout if timeout is ... else timeout)
        except asyncio.TimeoutError:
            limit = self.call_timeout if timeout is ... else timeout
            raise TimedOut(f"{what}: no answer within {limit} s") from None
        except capnp.KjException as e:
            raise _from_kj(e, what) from None

    async def _wait_until_final(self, job, call: str, name: str, timeout: Optional[float]):
        if job.final is None:
            done, _ = await asyncio.wait({job.done, self._disconnected}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.final is None:
                if not done:
                    raise TimedOut(f"{call}: {name} did not finish within {timeout} s")
                raise Disconnected(f"{call}: connection lost before {name} finished")

    async def submit(self, prompt_ids: Iterable[int], max_new_tokens: int = 16, *,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, stop_ids: Iterable[int] = (), deadline_ms: int = 0,
                     on_event: Optional[Callable[[JobEvent], None]] = None) -> int:
        """Queues a generation job; answers its id. `on_event` sees its events in order (the
        first may come before submit returns); if it raises, the job fails and is cancelled.
        `deadline_ms`: the job fails ("deadline exceeded") unless it finishes within this many
        milliseconds; 0: the cluster's default."""
        spec = _generation_spec(list(prompt_ids), max_new_tokens, temperature, top_k, top_p,
                                seed, list(stop_ids), deadline_ms)
        job = _Job(on_event)
        result = await self._call("submit", self._service.submit(spec, _Sink(job)))
        self._jobs[result.jobId] = job
        return result.jobId

    async def wait(self, job_id: int, timeout: Optional[float] = None) -> JobStatus:
        """Until job `job_id` (submitted here) finished: its final state and every token."""
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"wait: job {job_id} was not submitted by this client, "
                             "or was already waited for")
        await self._wait_until_final(job, "wait", f"job {job_id}", timeout)
        del self._jobs[job_id]
        return job.final

    async def generate(self, prompt_ids: Iterable[int], max_new_tokens: int = 16, **kwargs) -> List[int]:
        """submit + wait: the generated tokens. JobFailed / JobCancelled when it did not finish."""
        job_id = await self.submit(prompt_ids, max_new_tokens, **kwargs)
        final = await self.wait(job_id)
        if final.state == "failed":
            raise JobFailed(f"job {job_id} failed: {final.error}")
        if final.state == "cancelled":
            raise JobCancelled(f"job {job_id} was cancelled" + (f": {final.error}" if final.error else ""))
        return final.tokens

    async def status(self, job_id: int) -> JobStatus:
        return _status((await self._call("status", self._service.status(job_id))).status)

    async def cancel(self, job_id: int) -> bool:
        """Whether the job was still active."""
        return (await self._call("cancel", self._service.cancel(job_id))).wasActive

    async def describe(self) -> ClusterDescription:
        return _cluster((await self._call("describe", self._service.describe())).cluster)

    # --- training: the server's cluster trains its serving weights, one job at a time.
    # Training jobs have ids of their own, apart from generation jobs'. A server whose cluster
    # does not train raises Unavailable; one older than these calls, ServerError.

    async def submit_training(self, corpus, *, sequence_length: int = 64, batch_sequences: int = 8,
                              steps: int = 100, learning_rate: float = 1e-3, warmup_steps: int = 0,
                              min_learning_rate: float = 0.0, beta1: float = 0.9,
                              beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                              grad_clip: float = 1.0, balance_loss_weight: float = 1e-4,
                              bias_update_speed: float = 1e-3, seed: int = 0,
                              on_event: Optional[Callable[[TrainingEvent], None]] = None) -> int:
        """Queues a training job; answers its id.

        `corpus` is text (a str, tokenised by the server: one id per UTF-8 byte) or an iterable
        of token ids. It is cut into windows of `sequence_length` tokens, visited in an order
        shuffled by `seed`; each of `steps` AdamW steps trains on `batch_sequences` of them, the
        learning rate warming up over `warmup_steps` to `learning_rate`, then decaying (cosine)
        to `min_learning_rate`. `grad_clip` <= 0 turns clipping off; `balance_loss_weight` is
        the sequence-wise balance loss weight, `bias_update_speed` the routing-bias speed. The
        defaults are the server's (TrainingJob in api.capnp).

        `on_event` sees a TrainingEvent after every step and the final one (the first may come
        before this returns); a client that falls behind gets the newest. If it raises, the job
        fails and the server cancels it. Raises InvalidRequest (the field is named; or the
        server's: a token id outside the vocabulary, a sequence longer than the model's
        context, a corpus shorter than one sequence), Overloaded (the queue is full),
        Unavailable.
        """
        job_message = _training_spec(corpus, {
            "sequence_length": sequence_length, "batch_sequences": batch_sequences,
            "steps": steps, "learning_rate": learning_rate, "warmup_steps": warmup_steps,
            "min_learning_rate": min_learning_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
            "weight_decay": weight_decay, "grad_clip": grad_clip,
            "balance_loss_weight": balance_loss_weight, "bias_update_speed": bias_update_speed,
            "seed": seed})
        job = _TrainingJob(on_event)
        result = await self._call("submit_training",
                                  self._service.train(job_message, _TrainingSink(job)))
        self._training_jobs[result.jobId] = job
        return result.jobId

    async def wait_training(self, job_id: int, timeout: Optional[float] = None) -> TrainingEvent:
        """Until training job `job_id` (submitted here) ended: its final event, whatever its
        state. Forgotten once waited for."""
        job = self._training_jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"wait_training: training job {job_id} was not submitted by this "
                             "client, or was already waited for")
        await self._wait_until_final(job, "wait_training", f"training job {job_id}", timeout)
        del self._training_jobs[job_id]
        return job.final

    async def train(self, corpus, **kwargs) -> TrainingEvent:
        """submit_training + wait_training: the final event of a job that finished. JobFailed /
        JobCancelled (saying at which step) when it did not."""
        job_id = await self.submit_training(corpus, **kwargs)
        final = await self.wait_training(job_id)
        at = f"at step {final.step} of {final.steps}"
        if final.state == "failed":
            raise JobFailed(f"training job {job_id} failed {at}: {final.error}")
        if final.state == "cancelled":
            raise JobCancelled(f"training job {job_id} was cancelled {at}")
        return final

    async def training_status(self, job_id: int) -> TrainingEvent:
        """The training job's latest event (step 0, state "queued" before its first step)."""
        return _training_event(
            (await self._call("training_status", self._service.trainingStatus(job_id))).event)

    async def cancel_training(self, job_id: int) -> bool:
        """Whether the training job was still queued or running (it stops after its step)."""
        return (await self._call("cancel_training", self._service.cancelTraining(job_id))).wasActive

    async def checkpoint(self, directory: str, timeout: Optional[float] = 660.0) -> str:
        """Writes a training checkpoint of the cluster's weights to `directory` (an absolute
        path on the SERVER's file system), between two steps of a running job or now; answers
        the directory written. Takes as long as the running step plus the write, hence its own
        `timeout` (None: no limit). Raises InvalidRequest (not an absolute path), ServerError
        (the write failed: the text says why), TimedOut (it may still be written)."""
        directory = _check_directory(directory)
        result = await self._call("checkpoint", self._service.checkpoint(directory), timeout)
        return result.directory

    async def close(self) -> None:
        """Closes the connection; the server cancels every job still streaming to it."""
        self._disconnected.cancel()
        self._service = None
        self._rpc.close()
        self._stream.close()


# --- synchronous ----------------------------------------------------------------------------


class Client:
    """The API for synchronous code; thread-safe. The connection lives on a private thread
    running an asyncio loop with the kj loop open; `on_event` callbacks run on that thread."""

    def __init__(self, address: str, secret: Optional[str] = None, *,
                 connect_timeout: float = 10.0, call_timeout: Optional[float] = 60.0,
                 tls: Union[bool, ssl.SSLContext] = False, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 server_name: Optional[str] = None):
        """See AsyncClient.connect for the options (TLS among them)."""
        if secret is None:
            secret = os.environ.get("MOE_CLUSTER_SECRET", "")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped = None  # an asyncio.Event, made on the loop's thread
        self._client: Optional[AsyncClient] = None
        self._thread = threading.Thread(target=self._run, name="moe-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        try:
            self._client = self._do(AsyncClient.connect(
                address, secret, connect_timeout=connect_timeout, call_timeout=call_timeout,
                tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                server_name=server_name))
        except BaseException:
            self._shutdown()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve():
            self._stopped = asyncio.Event()
            async with capnp.kj_loop():
                self._ready.set()
                await self._stopped.wait()
                if self._client is not None:
                    await self._client.close()

        try:
            self._loop.run_until_complete(serve())
        finally:
            self._ready.set()
            self._loop.close()

    def _do(self, coro, timeout: Optional[float] = None):
        if not self._thread.is_alive():
            coro.close()
            raise Disconnected("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def submit(self, prompt_ids: Iterable[int], max_new_tokens: int = 16, **kwargs) -> int:
        return self._do(self._client.submit(prompt_ids, max_new_tokens, **kwargs))

    def wait(self, job_id: int, timeout: Optional[float] = None) -> JobStatus:
        return self._do(self._client.wait(job_id, timeout))

    def generate(self, prompt_ids: Iterable[int], max_new_tokens: int = 16, **kwargs) -> List[int]:
        return self._do(self._client.generate(prompt_ids, max_new_tokens, **kwargs))

    def status(self, job_id: int) -> JobStatus:
        return self._do(self._client.status(job_id))

    def cancel(self, job_id: int) -> bool:
        return self._do(self._client.cancel(job_id))

    def describe(self) -> ClusterDescription:
        return self._do(self._client.describe())

    def submit_training(self, corpus, **kwargs) -> int:
        """See AsyncClient.submit_training; `on_event` runs on the client's thread."""
        return self._do(self._client.submit_training(corpus, **kwargs))

    def wait_training(self, job_id: int, timeout: Optional[float] = None) -> TrainingEvent:
        """See AsyncClient.wait_training."""
        return self._do(self._client.wait_training(job_id, timeout))

    def train(self, corpus, **kwargs) -> TrainingEvent:
        """See AsyncClient.train: blocks until the training job ended."""
        return self._do(self._client.train(corpus, **kwargs))

    def training_status(self, job_id: int) -> TrainingEvent:
        """See AsyncClient.training_status."""
        return self._do(self._client.training_status(job_id))

    def cancel_training(self, job_id: int) -> bool:
        """See AsyncClient.cancel_training."""
        return self._do(self._client.cancel_training(job_id))

    def checkpoint(self, directory: str, timeout: Optional[float] = 660.0) -> str:
        """See AsyncClient.checkpoint."""
        return self._do(self._client.checkpoint(directory, timeout))

    @property
    def server_version(self) -> int:
        return self._client.server_version

    def _shutdown(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(lambda: self._stopped and self._stopped.set())
            self._thread.join()

    def close(self) -> None:
        """Closes the connection (the server cancels jobs still streaming) and the thread."""
        self._shutdown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
