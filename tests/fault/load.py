#!/usr/bin/env python3
"""Load and checks for the fault tests (tests/fault/): steady generation load against a cluster's
job API, a training job, and the comparisons that decide whether a fault run passed.

  load.py run      submits requests (a seeded pool of prompts of mixed lengths, greedy, few new
                   tokens) with bounded concurrency and writes every request's outcome as JSON
  load.py compare  a fault run against the baseline run: nothing lost, every request ended within
                   its deadline, finished ones have the baseline's tokens, failed ones a clear error;
                   prints detection and recovery times around the fault
  load.py train    one training job through the API, every step's loss as JSON
  load.py compare-train
                   a fault run's training losses against the baseline run's

Outcomes of a request:
  finished   the server finished it (tokens recorded)
  failed     the server ended it with an error (its text recorded), or cancelled it
  rejected   submit was refused (the error code and text recorded: unavailable, overloaded, ...)
  lost       no answer by the request's deadline plus a grace period, or still pending when the
             whole run's bound expired: the server never said what became of it
A request also records `late` when its answer came after its deadline.

Each request carries its deadline to the server (the job API's deadlineMs, where the client has
it) and the driver holds it to the same deadline on the client side.

Uses the project's Python client (python/moe_client, pycapnp 2.x): run it with the project's
venv (.venv/bin/python) with PYTHONPATH=python. With --via-moe BINARY each request is a
`moe submit` process instead (the C++ client, one connection each): for clients whose traffic is
corrupted on purpose, whose failures must stay with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
import urllib.request
from datetime import datetime
from typing import Dict, List, Optional

EXIT_FAIL = 1
EXIT_CANNOT_RUN = 2

# --- the request set --------------------------------------------------------------------------


def make_pool(seed: int, size: int, vocab: int, max_new_tokens: int) -> List[dict]:
    """`size` distinct prompts: lengths from one token to a few dozen, ids in [2, vocab) (0 and 1
    are the tiny model's BOS/EOS), each with its own small max_new_tokens."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 48]
    pool = []
    for i in range(size):
        n = lengths[i % len(lengths)]
        pool.append({
            "prompt": [rng.randrange(2, vocab) for _ in range(n)],
            "max_new_tokens": rng.randint(max(1, max_new_tokens // 2), max_new_tokens),
        })
    return pool


def make_requests(seed: int, pool: List[dict], count: int, baseline_pool: bool, via: str) -> List[dict]:
    """The run's requests in submission order; the pool in order once for a baseline."""
    rng = random.Random(seed + 1)
    out = []
    for i in range(len(pool) if baseline_pool else count):
        p = i if baseline_pool else rng.randrange(len(pool))
        out.append({"index": i, "pool_index": p, "prompt": pool[p]["prompt"],
                    "max_new_tokens": pool[p]["max_new_tokens"], "via": via})
    return out


# --- running the load -------------------------------------------------------------------------


def _import_client():
    try:
        import capnp  # noqa: F401
        import moe_client
    except ImportError as e:
        print(f"load.py: cannot import the project's client ({e}): run it with the project's venv "
              "and PYTHONPATH=python", file=sys.stderr)
        sys.exit(EXIT_CANNOT_RUN)
    return moe_client


class _Connections:
    """Direct connections shared by the requests (round robin); one that dropped is replaced at
    its next use, so a connection lost to a fault does not take later requests with it."""

    def __init__(self, mc, address: str, secret: str, count: int, call_timeout: float):
        self._mc, self._address, self._secret = mc, address, secret
        self._call_timeout = call_timeout
        self._clients: List[Optional[object]] = [None] * count
        self._locks = [asyncio.Lock() for _ in range(count)]

    async def get(self, i: int):
        k = i % len(self._clients)
        async with self._locks[k]:
            if self._clients[k] is None:
                self._clients[k] = await self._mc.AsyncClient.connect(
                    self._address, self._secret, connect_timeout=5.0, call_timeout=self._call_timeout)
            return k, self._clients[k]

    async def drop(self, k: int, client) -> None:
        async with self._locks[k]:
            if self._clients[k] is client:
                self._clients[k] = None
                try:
                    await client.close()
                except Exception:
                    pass

    async def close(self) -> None:
        for c in self._clients:
            if c is not None:
                try:
                    await c.close()
                except Exception:
                    pass


def _progress(path: Optional[str], done: int, total: int) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{done} {total}\n")
    os.replace(tmp, path)


def _takes_deadline(mc) -> bool:
    """Whether this client passes a deadline to the server (added with the recovery work)."""
    import inspect
    try:
        schema_has = "deadlineMs" in mc.client.api.GenerationJob.schema.fieldnames
    except AttributeError:
        schema_has = False
    return schema_has and "deadline_ms" in inspect.signature(mc.AsyncClient.submit).parameters


async def _one_request(mc, req: dict, conns: _Connections, deadline: float, grace: float) -> None:
    req["submit_unix"] = time.time()
    limit = req["submit_unix"] + deadline + grace

    def left() -> float:
        return max(0.01, limit - time.time())

    client, k = None, None
    try:
        k, client = await asyncio.wait_for(conns.get(req["index"]), left())
        extra = {"deadline_ms": int(deadline * 1000)} if _takes_deadline(mc) else {}
        job_id = await asyncio.wait_for(
            client.submit(req["prompt"], req["max_new_tokens"], **extra), left())
        req["job_id"] = job_id
        final = await client.wait(job_id, timeout=left())
        req["tokens"] = list(final.tokens)
        req["outcome"] = "finished" if final.state == "finished" else "failed"
        req["state"] = final.state
        req["error"] = final.error or ("" if final.state == "finished" else f"state {final.state}")
    except (asyncio.TimeoutError, mc.TimedOut) as e:
        req["outcome"] = "lost"
        req["error"] = f"no answer within the deadline of {deadline:g} s (+{grace:g} s grace)"
        if isinstance(e, mc.TimedOut):
            req["error"] += f": {e}"
    except mc.MoeError as e:
        # Refused at submit, or the connection went away under it.
        req["outcome"] = "rejected" if "job_id" not in req else "failed"
        req["error"] = f"{e.code}: {e}"
        if k is not None and isinstance(e, (mc.Disconnected, mc.ConnectionFailed)):
            await conns.drop(k, client)
    except Exception as e:  # a client bug must show up as such, not as a hang
        req["outcome"] = "failed"
        req["error"] = f"client exception {type(e).__name__}: {e}"
    req["end_unix"] = time.time()
    req["late"] = req["end_unix"] - req["submit_unix"] > deadline + 1.0


async def _one_submit_process(args, req: dict) -> None:
    """The request as `moe submit` (the C++ client) in a process of its own: what a corrupted
    connection does to a client stays in that process."""
    req["submit_unix"] = time.time()
    argv = [args.via_moe, "submit", "--address", args.address, "--prompt-ids",
            ",".join(str(t) for t in req["prompt"]), "--max-new-tokens", str(req["max_new_tokens"]),
            "--deadline-ms", str(int(args.deadline * 1000))]
    if args.secret_file:
        argv += ["--secret-file", args.secret_file]
    env = dict(os.environ)
    if args.secret:
        env["MOE_CLUSTER_SECRET"] = args.secret
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.deadline + args.grace)
        text = err.decode(errors="replace").strip()
        if proc.returncode == 0:
            req["outcome"] = "finished"
            req["tokens"] = [int(t) for t in out.split()]
        else:
            req["outcome"] = "failed"
            req["error"] = text or f"moe submit exited {proc.returncode}"
    except asyncio.CancelledError:
        proc.kill()  # the run's bound expired: no process outlives the driver
        raise
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        req["outcome"] = "lost"
        req["error"] = f"moe submit: no answer within the deadline of {args.deadline:g} s (+{args.grace:g} s grace)"
    req["end_unix"] = time.time()
    req["late"] = req["end_unix"] - req["submit_unix"] > args.deadline + 1.0


async def _run(args, requests: List[dict]) -> dict:
    if args.via_moe:
        return await _drive(args, requests, lambda req: _one_submit_process(args, req))
    mc = _import_client()
    import capnp

    secret = _read_secret(args)
    async with capnp.kj_loop():
        conns = _Connections(mc, args.address, secret, args.connections, args.deadline)
        try:
            await conns.get(0)  # fail early and clearly when the API is not there
        except mc.MoeError as e:
            print(f"load.py: cannot reach the API at {args.address}: {e}", file=sys.stderr)
            sys.exit(EXIT_CANNOT_RUN)
        result = await _drive(args, requests,
                              lambda req: _one_request(mc, req, conns, args.deadline, args.grace))
        await conns.close()
    return result


async def _drive(args, requests: List[dict], one) -> dict:
    """Runs `one(req)` for every request, at most --concurrency at once, the i-th not before
    i / --rate seconds into the run (a steady arrival rate), within the run's --bound."""
    sem = asyncio.Semaphore(args.concurrency)
    done = 0
    started = time.time()

    async def task(req):
        nonlocal done
        if args.rate > 0:
            await asyncio.sleep(max(0.0, started + req["index"] / args.rate - time.time()))
        async with sem:
            await one(req)
        done += 1
        _progress(args.progress, done, len(requests))

    tasks = [asyncio.ensure_future(task(r)) for r in requests]
    _, pending = await asyncio.wait(tasks, timeout=args.bound)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    now = time.time()
    for r in requests:
        if "outcome" not in r:
            r["outcome"] = "lost"
            r["error"] = f"still pending when the run's bound of {args.bound:g} s expired"
            r.setdefault("submit_unix", None)
            r["end_unix"] = None
            r["late"] = True
    return {"address": args.address, "started_unix": started, "ended_unix": now,
            "deadline_s": args.deadline, "requests": requests}


def _read_secret(args) -> str:
    if args.secret_file:
        with open(args.secret_file) as f:
            return f.readline().strip()
    return args.secret or os.environ.get("MOE_CLUSTER_SECRET", "")


def cmd_run(args) -> int:
    pool = make_pool(args.seed, args.pool, args.vocab, args.max_new_tokens)
    requests = make_requests(args.seed, pool, args.requests, args.baseline_pool,
                             "moe-submit" if args.via_moe else "direct")
    result = asyncio.run(_run(args, requests))
    result["pool"] = pool
    with open(args.out, "w") as f:
        json.dump(result, f)
    counts: Dict[str, int] = {}
    for r in result["requests"]:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    took = result["ended_unix"] - result["started_unix"]
    print(f"load.py run: {len(requests)} requests in {took:.1f} s: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if args.expect_all_finished and counts.get("finished", 0) != len(requests):
        for r in result["requests"]:
            if r["outcome"] != "finished":
                print(f"  request {r['index']}: {r['outcome']}: {(r.get('error') or '').splitlines()[:1]}",
                      file=sys.stderr)
                break
        return EXIT_FAIL
    return 0


# --- comparing --------------------------------------------------------------------------------

# What a "clear" error looks like: a code or a sentence, not an empty string or a bare word.
_CLEAR_ERROR = re.compile(r"\w+.*[\s:].*\w")


def spdlog_unix(line: str) -> Optional[float]:
    """The local-time timestamp spdlog's default pattern puts first: [2025-01-31 12:00:00.123]."""
    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]", line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def log_transition(path: str, node: str, to: str, after: float) -> Optional[tuple]:
    """The first `node ... -> TO` line of a coordinator log at or after `after` (unix seconds):
    (unix time, the line)."""
    return log_line(path, rf"node {re.escape(node)} \(.*\) \w+ -> {re.escape(to)}\b", after)


def log_lines(path: str, regex: str, after: float) -> List[str]:
    """Every line of a log matching `regex` stamped at or after `after`."""
    out = []
    if path and os.path.exists(path):
        pattern = re.compile(regex)
        with open(path, errors="replace") as f:
            for line in f:
                t = spdlog_unix(line)
                if t is not None and t >= after - 0.005 and pattern.search(line):
                    out.append(line.strip())
    return out


def log_line(path: str, regex: str, after: float) -> Optional[tuple]:
    """The first line of a log matching `regex` stamped at or after `after`: (unix time, line)."""
    if not path or not os.path.exists(path):
        return None
    pattern = re.compile(regex)
    with open(path, errors="replace") as f:
        for line in f:
            if pattern.search(line):
                t = spdlog_unix(line)
                if t is not None and t >= after - 0.005:
                    return t, line.strip()
    return None


def scrape(url: str) -> Dict[str, float]:
    out = {}
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except Exception as e:
        print(f"  (cannot scrape {url}: {e})")
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def _summarise_errors(requests: List[dict]) -> List[str]:
    texts: Dict[str, int] = {}
    for r in requests:
        if r["outcome"] != "finished":
            # Numbers differ per request (job ids, shards, ports): group by the shape of the text.
            first = (r.get("error") or "").splitlines()[0] if r.get("error") else ""
            key = f"{r['outcome']}: " + re.sub(r"\d+", "N", first)[:160]
            texts[key] = texts.get(key, 0) + 1
    return [f"{n:4d} x {k}" for k, n in sorted(texts.items(), key=lambda kv: -kv[1])]


def cmd_compare(args) -> int:
    with open(args.baseline) as f:
        base = json.load(f)
    with open(args.run) as f:
        run = json.load(f)
    want = {}
    for r in base["requests"]:
        if r["outcome"] == "finished":
            want[r["pool_index"]] = r["tokens"]
    failures: List[str] = []

    def fail(text: str) -> None:
        failures.append(text)

    if len(want) != len(base["pool"]):
        fail(f"the baseline itself did not finish every prompt ({len(want)} of {len(base['pool'])})")
    allowed = re.compile(args.allow_failed) if args.allow_failed else None
    reqs = run["requests"]
    direct = [r for r in reqs if r["via"] == "direct"]
    counts: Dict[str, int] = {}
    for r in direct:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    shown = 0

    def show(r: dict, why: str) -> None:
        nonlocal shown
        if shown < 8:
            print(f"  request {r['index']} (prompt {r['pool_index']}, {len(r['prompt'])} tokens): "
                  + why.splitlines()[0][:300] if why else "")
        shown += 1

    mismatched = lost = late = unclear = disallowed = 0
    for r in direct:
        o = r["outcome"]
        if o == "lost":
            lost += 1
            show(r, f"LOST: {r.get('error', '')}")
            continue
        if r.get("late"):
            late += 1
            show(r, f"ended {r['end_unix'] - r['submit_unix']:.1f} s after submission, past its deadline "
                    f"of {run['deadline_s']:g} s ({o}: {r.get('error', '')})")
        if o == "finished":
            expected = want.get(r["pool_index"])
            if expected is not None and r["tokens"] != expected:
                mismatched += 1
                show(r, f"tokens {r['tokens']} differ from the baseline's {expected}")
            continue
        err = r.get("error", "")
        if not _CLEAR_ERROR.search(err):
            unclear += 1
            show(r, f"{o} without a clear error: {err!r}")
        elif args.require_all_finished or (allowed is not None and not allowed.search(err)):
            disallowed += 1
            show(r, f"{o}: {err}")
    if shown > 8:
        print(f"  ... and {shown - 8} more")
    if lost:
        fail(f"{lost} request(s) LOST (no answer from the server)")
    if late:
        fail(f"{late} request(s) ended after their deadline")
    if mismatched:
        fail(f"{mismatched} finished request(s) differ from the baseline's greedy tokens")
    if unclear:
        fail(f"{unclear} request(s) failed without a clear error text")
    if disallowed:
        fail(f"{disallowed} request(s) failed or were refused where the cluster should have served or "
             "recovered" + ("" if args.require_all_finished else f" (allowed failures match /{args.allow_failed}/)"))
    if args.min_finished is not None and counts.get("finished", 0) < args.min_finished:
        fail(f"only {counts.get('finished', 0)} request(s) finished, fewer than {args.min_finished}")

    took = run["ended_unix"] - run["started_unix"]
    print(f"{args.label}: {len(direct)} direct requests in {took:.1f} s: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; {len(want)} baseline prompts")
    errors = _summarise_errors(direct)
    if errors:
        print("  errors (numbers shown as N):")
        for line in errors[:6]:
            print(f"    {line}")

    _print_timings(args, direct)
    if failures:
        for f_ in failures:
            print(f"FAIL: {args.label}: {f_}")
        return EXIT_FAIL
    print(f"{args.label}: ok")
    return 0


def _print_timings(args, reqs: List[dict]) -> None:
    """Detection and recovery around the fault at --fault-unix."""
    if args.fault_unix is None:
        return
    t0 = args.fault_unix
    print(f"  timings from the fault at unix {t0:.3f}:")
    down = None
    if args.coordinator_log and args.node:
        hit = log_transition(args.coordinator_log, args.node, "down", t0)
        if hit:
            down = hit[0]
            print(f"    detection: {down - t0:.3f} s (coordinator log: {hit[1][:160]})")
        else:
            print(f"    detection: no '{args.node} ... -> down' in the coordinator's log")
        up = log_transition(args.coordinator_log, args.node, "up", t0)
        if up:
            print(f"    node back up: {up[0] - t0:.3f} s after the fault")
    if args.coordinator_log:
        for line in log_lines(args.coordinator_log, r"failover|is down \(|replayed|deadline", t0)[:4]:
            print(f"    log: {line[:200]}")
    if args.coordinator_log and args.node:
        hit = log_line(args.coordinator_log, rf"recovered from node {re.escape(args.node)} going down", t0)
        if hit:
            print(f"    the coordinator's recovery: {hit[0] - t0:.3f} s after the fault ({hit[1][:160]})")
    if args.metrics_url:
        m = scrape(args.metrics_url)
        n = m.get("moe_cluster_failure_detection_seconds_count", 0)
        if n:
            s = m.get("moe_cluster_failure_detection_seconds_sum", 0)
            print(f"    moe_cluster_failure_detection_seconds: {n:g} observation(s), mean {s / n:.3f} s "
                  "(from the last answered heartbeat)")
        n = m.get("moe_recovery_seconds_count", 0)
        if n:
            s = m.get("moe_recovery_seconds_sum", 0)
            print(f"    moe_recovery_seconds: {n:g} observation(s), mean {s / n:.3f} s; requests replayed: "
                  f"{m.get('moe_controller_requests_replayed_total', 0):g}; deadlines exceeded: "
                  f"{m.get('moe_controller_deadlines_exceeded_total', 0):g}")
    ended = [r for r in reqs if r.get("end_unix") is not None]
    in_flight = [r for r in ended if r["submit_unix"] <= t0 < r["end_unix"]]
    if in_flight:
        last = max(r["end_unix"] for r in in_flight)
        fin = sum(1 for r in in_flight if r["outcome"] == "finished")
        print(f"    {len(in_flight)} request(s) in flight at the fault ({fin} finished, "
              f"{len(in_flight) - fin} not): all ended {last - t0:.3f} s after it")
    after = down if down is not None else t0
    again = sorted(r["end_unix"] for r in ended
                   if r["submit_unix"] >= after and r["outcome"] == "finished")
    if again:
        print(f"    recovery: the first request submitted after the "
              f"{'down event' if down is not None else 'fault'} finished {again[0] - t0:.3f} s after the fault")
    else:
        print("    recovery: no request submitted after the fault finished")
    done = sorted(r["end_unix"] for r in ended if r["outcome"] == "finished")
    gaps = [(b - a, a) for a, b in zip(done, done[1:]) if b >= t0 - 1]
    if gaps:
        g, at = max(gaps)
        print(f"    longest pause between finished requests: {g:.3f} s (from {at - t0:+.3f} s)")


# --- training ---------------------------------------------------------------------------------


async def _train(args) -> dict:
    mc = _import_client()
    import capnp

    secret = _read_secret(args)
    with open(args.corpus, errors="replace") as f:
        text = f.read()[: args.corpus_bytes]
    events = []
    async with capnp.kj_loop():
        try:
            client = await mc.AsyncClient.connect(args.address, secret, connect_timeout=5.0)
        except mc.MoeError as e:
            print(f"load.py: cannot reach the API at {args.address}: {e}", file=sys.stderr)
            sys.exit(EXIT_CANNOT_RUN)

        def on_event(e):
            events.append({"step": e.step, "loss": e.loss, "state": e.state, "error": e.error,
                           "finished": e.finished, "rollbacks": e.rollbacks, "unix": time.time()})
            _progress(args.progress, e.step, e.steps)

        started = time.time()
        final = {"state": "lost", "error": f"no final event within {args.bound:g} s"}
        try:
            job = await client.submit_training(text, steps=args.steps, sequence_length=args.seq_len,
                                               batch_sequences=args.batch, learning_rate=args.lr,
                                               seed=args.seed, on_event=on_event)
            ev = await client.wait_training(job, timeout=args.bound)
            final = {"state": ev.state, "error": ev.error, "step": ev.step, "rollbacks": ev.rollbacks}
        except mc.MoeError as e:
            final = {"state": "lost" if isinstance(e, mc.TimedOut) else "failed", "error": f"{e.code}: {e}"}
        ended = time.time()
        try:
            await client.close()
        except Exception:
            pass
    return {"started_unix": started, "ended_unix": ended, "final": final, "events": events,
            "steps": args.steps}


def cmd_train(args) -> int:
    result = asyncio.run(_train(args))
    with open(args.out, "w") as f:
        json.dump(result, f)
    fin = result["final"]
    print(f"load.py train: {fin['state']} after {result['ended_unix'] - result['started_unix']:.1f} s, "
          f"{len(result['events'])} events" + (f": {fin['error']}" if fin.get("error") else ""))
    return 0


def _losses(run: dict) -> Dict[int, float]:
    """The loss of every step reported; a step done again after a rollback keeps its last value."""
    out = {}
    for e in run["events"]:
        if e["step"] > 0 and e["state"] in ("running", "finished"):
            out[e["step"]] = e["loss"]
    return out


def cmd_compare_train(args) -> int:
    with open(args.baseline) as f:
        base = json.load(f)
    with open(args.run) as f:
        run = json.load(f)
    failures = []
    if base["final"]["state"] != "finished":
        failures.append(f"the baseline training did not finish: {base['final']}")
    fin = run["final"]
    if args.expect_stop:
        # The contract until training rolls back: the job stops with a clear error, in bounded
        # time, and every step it did report matches the baseline.
        if fin["state"] != "failed" or args.expect_stop not in fin.get("error", ""):
            failures.append(f"expected the job to stop with '{args.expect_stop}', it ended {fin['state']}: "
                            f"{fin.get('error', '')}")
    elif fin["state"] != "finished":
        failures.append(f"the training job under the fault ended {fin['state']}: {fin.get('error', '')}")
    want, got = _losses(base), _losses(run)
    common = sorted(set(want) & set(got))
    worst = max((abs(want[s] - got[s]) for s in common), default=0.0)
    bad = [s for s in common if abs(want[s] - got[s]) > args.tolerance]
    print(f"{args.label}: baseline {len(want)} steps reported, fault run {len(got)}; "
          f"{len(common)} compared, largest difference {worst:.2e}")
    for s in common[:3] + common[-3:]:
        print(f"    step {s}: baseline {want[s]:.6f}, fault run {got[s]:.6f}")
    if bad:
        failures.append(f"{len(bad)} step(s) differ by more than {args.tolerance:g}: steps {bad[:10]}")
    if fin["state"] == "finished" and run["steps"] not in got:
        failures.append(f"the last step ({run['steps']}) was not reported")
    rollbacks = fin.get("rollbacks", 0)
    if args.expect_rollbacks is not None or args.max_rollbacks is not None:
        print(f"  rollbacks to a snapshot: {rollbacks}")
    if args.expect_rollbacks is not None and rollbacks < args.expect_rollbacks:
        failures.append(f"the job rolled back {rollbacks} time(s), expected at least {args.expect_rollbacks}")
    if args.max_rollbacks is not None and rollbacks > args.max_rollbacks:
        failures.append(f"the job rolled back {rollbacks} time(s), expected at most {args.max_rollbacks}")
    if args.fault_unix is not None:
        t0 = args.fault_unix
        before = [e for e in run["events"] if e["unix"] <= t0]
        after = [e for e in run["events"] if e["unix"] > t0 and e["state"] == "running"]
        at = before[-1]["step"] if before else 0
        print(f"  fault at step {at}; first step after it reported "
              + (f"{after[0]['unix'] - t0:.3f} s later (step {after[0]['step']})" if after else "never"))
        if args.coordinator_log and args.node:
            hit = log_transition(args.coordinator_log, args.node, "down", t0)
            print(f"    detection: {hit[0] - t0:.3f} s" if hit else
                  f"    detection: no '{args.node} ... -> down' in the coordinator's log")
        if args.coordinator_log:
            hit = log_line(args.coordinator_log, r"training rolled back to the snapshot.* s after the failure", t0)
            if hit:
                print(f"    rollback done on the survivors: {hit[0] - t0:.3f} s after the fault ({hit[1][:200]})")
        redone = [e for e in run["events"] if e["unix"] > t0 and e.get("rollbacks", 0) > 0]
        if redone:
            print(f"    first step after the rollback reported {redone[0]['unix'] - t0:.3f} s after the fault "
                  f"(step {redone[0]['step']})")
    if failures:
        for f_ in failures:
            print(f"FAIL: {args.label}: {f_}")
        return EXIT_FAIL
    print(f"{args.label}: ok")
    return 0


# --- command line -----------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common_api(s):
        s.add_argument("--address", required=True, help="the job API, HOST:PORT")
        s.add_argument("--secret", default="", help="the cluster secret (prefer --secret-file)")
        s.add_argument("--secret-file", default="")
        s.add_argument("--out", required=True, help="JSON written here")
        s.add_argument("--progress", default="", help="a file kept at 'DONE TOTAL'")
        s.add_argument("--seed", type=int, default=7)

    r = sub.add_parser("run", help="steady generation load")
    common_api(r)
    r.add_argument("--requests", type=int, default=300)
    r.add_argument("--pool", type=int, default=40, help="distinct prompts")
    r.add_argument("--baseline-pool", action="store_true", help="each prompt of the pool once")
    r.add_argument("--expect-all-finished", action="store_true", help="exit 1 unless every request finished")
    r.add_argument("--concurrency", type=int, default=16)
    r.add_argument("--connections", type=int, default=4)
    r.add_argument("--vocab", type=int, default=512)
    r.add_argument("--max-new-tokens", type=int, default=6)
    r.add_argument("--deadline", type=float, default=30.0, help="seconds each request may take")
    r.add_argument("--grace", type=float, default=5.0, help="waited past the deadline before LOST")
    r.add_argument("--bound", type=float, default=240.0, help="seconds for the whole run")
    r.add_argument("--rate", type=float, default=0.0,
                   help="requests started per second (a steady load); 0: as fast as --concurrency allows")
    r.add_argument("--via-moe", default="",
                   help="a moe binary: send each request with `moe submit` in a process of its own "
                        "(e.g. through a corrupting proxy) instead of the Python client")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="a fault run against the baseline")
    c.add_argument("--baseline", required=True)
    c.add_argument("--run", required=True)
    c.add_argument("--label", default="fault run")
    c.add_argument("--allow-failed", default="",
                   help="a regex every failed or refused request's error must match (default: any clear error)")
    c.add_argument("--min-finished", type=int, default=None)
    c.add_argument("--require-all-finished", action="store_true",
                   help="no direct request may fail or be refused")
    c.add_argument("--fault-unix", type=float, default=None, help="when the fault was injected")
    c.add_argument("--node", default="", help="the node the fault hit (for the detection time)")
    c.add_argument("--coordinator-log", default="", help="moe serve's stdout")
    c.add_argument("--metrics-url", default="", help="the coordinator's /metrics")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("train", help="one training job through the API")
    common_api(t)
    t.add_argument("--corpus", required=True)
    t.add_argument("--corpus-bytes", type=int, default=4096)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--seq-len", type=int, default=16)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--bound", type=float, default=120.0)
    t.set_defaults(func=cmd_train)

    ct = sub.add_parser("compare-train", help="training losses under a fault against the baseline")
    ct.add_argument("--baseline", required=True)
    ct.add_argument("--run", required=True)
    ct.add_argument("--label", default="training under a fault")
    ct.add_argument("--tolerance", type=float, default=1e-4)
    ct.add_argument("--fault-unix", type=float, default=None)
    ct.add_argument("--node", default="")
    ct.add_argument("--coordinator-log", default="")
    ct.add_argument("--expect-rollbacks", type=int, default=None,
                    help="the fault run must have rolled back to a snapshot at least this often")
    ct.add_argument("--max-rollbacks", type=int, default=None,
                    help="the fault run must have rolled back at most this often (0: a fault to ride out)")
    ct.add_argument("--expect-stop", default="",
                    help="the fault run must end failed with this text in its error (no rollback yet)")
    ct.set_defaults(func=cmd_compare_train)

    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
