#!/usr/bin/env python3
"""bench/expert_parallel_bench.cpp built on the emulator (CMakeLists.txt beside this file), run in
a world of two emulated devices at a tiny size with skewed routing and receive budgets small
enough to need chunks: checks the JSON has every budget's figures, that the whole exchange ran in
one chunk and the small budgets in more, in fewer bytes, and that every budget's outputs are the
whole exchange's, bit for bit. Speeds on the emulator mean nothing; only their presence is
checked.

usage: ep_bench_smoke.py BENCH_BINARY WORK_DIR
"""
import json
import math
import os
import subprocess
import sys


def fail(message):
    print(f"ep_bench_smoke: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    binary, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "expert_parallel.json")
    args = [binary, "--world", "2", "--experts", "8", "--dim", "32", "--intermediate", "16",
            "--top-k", "3", "--tokens", "4,24", "--budgets", "0.25,0.02", "--skew", "0.6",
            "--dtype", "bf16", "--reps", "2", "--out", out]
    run = subprocess.run(args, capture_output=True, text=True, timeout=240)
    if run.returncode != 0:
        fail(f"exit {run.returncode}: {run.stderr[-2000:]}")
    doc = json.loads(run.stdout)
    with open(out) as f:
        if json.load(f) != doc:
            fail("--out differs from what was printed")
    if doc.get("world") != 2 or len(doc.get("runs", [])) != 2:
        fail(f"expected a world of 2 and two token counts: {json.dumps(doc)[:500]}")
    chunked = 0
    for run in doc["runs"]:
        budgets = run["budgets"]
        if len(budgets) != 3:
            fail(f"{run['tokens_per_rank']} tokens: {len(budgets)} budgets, not 3")
        whole = budgets[0]
        for b in budgets:
            where = f"{run['tokens_per_rank']} tokens, fraction {b.get('fraction')}"
            if "error" in b:
                fail(f"{where}: {b['error']}")
            for key in ("ms", "recv_rows", "device_bytes", "chunks"):
                if not isinstance(b.get(key), (int, float)) or not math.isfinite(b[key]) or b[key] <= 0:
                    fail(f"{where}: {key} is {b.get(key)!r}")
            if b.get("same_bits") is not True:
                fail(f"{where}: the outputs are not the whole exchange's")
        if whole["fraction"] != 1.0 or whole["chunks"] != 1 or whole["recv_rows"] != run["worst_recv_rows"]:
            fail(f"the whole exchange: {whole}")
        for b in budgets[1:]:
            if b["device_bytes"] >= whole["device_bytes"] or not 0 < b["bytes_ratio"] < 1:
                fail(f"budget {b['fraction']} holds {b['device_bytes']} bytes, the whole {whole['device_bytes']}")
            if b["time_ratio"] <= 0:
                fail(f"budget {b['fraction']}: time_ratio {b['time_ratio']}")
            chunked += b["chunks"] > 1
    if chunked < 2:
        fail(f"only {chunked} budgets ran in several chunks: the routing or the budgets are too small")
    print(f"ep_bench_smoke: ok ({chunked} budgets in chunks)")


if __name__ == "__main__":
    main()
