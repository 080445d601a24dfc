#!/usr/bin/env python3
"""bench/gpu_engine_bench.cpp built on the emulator (CMakeLists.txt beside this file), run at a
tiny size with every stage on: checks the JSON it writes has every figure the GPU checks read,
each variant measured on the kernels it is meant to measure, and no stage's error. Speeds on
the emulator mean nothing; only their presence and the ratios' consistency are checked.

usage: bench_smoke.py BENCH_BINARY WORK_DIR
"""
import json
import math
import os
import subprocess
import sys


def fail(message):
    print(f"bench_smoke: {message}", file=sys.stderr)
    sys.exit(1)


def positive(figures, key, where):
    value = figures.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        fail(f"{where}: {key} is {value!r}, not a positive number")
    return value


def errors(node, path="$"):
    """Every {"error": ...} in the document, with where it is."""
    if isinstance(node, dict):
        if "error" in node:
            yield path, node["error"]
        for k, v in node.items():
            yield from errors(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from errors(v, f"{path}[{i}]")


def run_bench(binary, args, out, timeout, what):
    """Runs the benchmark writing to `out`; its JSON, checked to be what it also printed."""
    if os.path.exists(out):
        os.remove(out)
    run = subprocess.run([binary, "--preset", "tiny", "--prefill-batch", "1",
                          "--prefill-len", "256", "--context", "8", "--decode-steps", "2",
                          "--reps", "1"] + args + ["--out", out],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=timeout)
    if run.returncode != 0:
        fail(f"{what}: exit {run.returncode}\n{run.stderr[-4000:]}")
    with open(out) as f:
        j = json.load(f)
    if json.loads(run.stdout) != j:
        fail(f"{what}: the JSON printed and the one written differ")
    return j


def main():
    if len(sys.argv) != 3:
        fail(__doc__.strip().splitlines()[-1])
    binary, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "bench_gpu_engine.json")
    peer = os.path.join(work, "peer.json")
    # A peer file as transformers_peer.py writes it, so that the ratios are computed.
    with open(peer, "w") as f:
        json.dump({"prefill": {"tokens_per_s": 100.0},
                   "decode": [{"batch": 1, "tokens_per_s": 10.0},
                              {"batch": 8, "tokens_per_s": 20.0}]}, f)
    # tiny: 16 experts, 4 per token; 256 prompt tokens give 1024 expert rows, enough for the
    # grouped GEMM's wide tiling (64 rows per expert), which wgmma_experts needs. Batch 1 is
    # within the default skinny_rows (4), batch 8 past it (the grouped-dense variant's).
    j = run_bench(binary, ["--decode-batch", "1,8", "--check-tokens", "4", "--check-steps", "1",
                           "--fp8", "block_scaled,expand", "--peer", peer], out, 540,
                  "every stage")
    found = list(errors(j))
    if found:
        fail("stages failed: " + "; ".join(f"{p}: {e}" for p, e in found))

    base_prefill = positive(j["prefill"], "tokens_per_s", "prefill")
    decode = {d["batch"]: d for d in j["decode"]}
    if sorted(decode) != [1, 8] or sorted(d["batch"] for d in j["decode_eager"]) != [1, 8]:
        fail(f"decode batches {sorted(decode)}, expected [1, 8]")
    for b, d in decode.items():
        positive(d, "tokens_per_s", f"decode batch {b}")
        positive(d, "speedup_over_eager", f"decode batch {b}")
        if d["tokens_compared"] != b * 2:
            fail(f"decode batch {b}: {d['tokens_compared']} tokens compared, expected {b * 2}")
        # The launches a step replays: at least a few per layer of the tiny model's 3.
        if not 3 * 10 <= d.get("graph_nodes", 0) <= 3 * 40:
            fail(f"decode batch {b}: graph_nodes {d.get('graph_nodes')}")
    sampled = j["decode_sampled"]
    if [d["batch"] for d in sampled] != [1, 8]:
        fail(f"decode_sampled batches: {sampled}")
    for d in sampled:
        positive(d, "sampling_cost", f"decode_sampled batch {d['batch']}")
    stats = j["decode_graph_stats"]
    if stats["captured"] < 1 or stats["replays"] < 1:
        fail(f"no decode graph was replayed: {stats}")
    # The default engine: prefill's routed experts on our kernel, none on wgmma or cuBLAS.
    k = j["kernels"]
    if k["experts_grouped_gemm"] == 0 or k["experts_wgmma"] != 0 or k["experts_cublas"] != 0:
        fail(f"default engine's kernels: {k}")
    vs = j["vs_transformers"]
    if set(vs) != {"prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s"}:
        fail(f"ratios to the peer: {vs}")
    if not math.isclose(vs["prefill_tokens_per_s"], base_prefill / 100.0, rel_tol=1e-9):
        fail(f"prefill ratio {vs['prefill_tokens_per_s']} is not {base_prefill} / 100")
    if [t["what"] for t in j["targets"]] != ["prefill tokens/s >= 250000",
                                             "decode batch 1 ms/token <= 1.5"]:
        fail(f"targets: {j['targets']}")
    check = j["check_against_reference"]
    if check["greedy_compared"] != 2 or not 0 <= check["routing_same_share"] <= 1:
        fail(f"check against the reference: {check}")

    # The variants, each measured on what it is for, with its ratio to the default engine.
    for key, counter in (("prefill_cublas_grouped_experts", "experts_cublas"),
                         ("prefill_wgmma_experts", "experts_wgmma")):
        p = j[key]
        ratio = positive(p, "speedup_over_ours", key)
        if not math.isclose(ratio, p["tokens_per_s"] / base_prefill, rel_tol=1e-9):
            fail(f"{key}: speedup {ratio} is not its tokens/s over the default's")
        if p["kernels"][counter] == 0:
            fail(f"{key} ran none of its products on {counter}: {p['kernels']}")
    grouped = j["decode_grouped_dense"]
    if [d["batch"] for d in grouped] != [8]:
        fail(f"decode_grouped_dense batches: {grouped}")
    positive(grouped[0], "speedup_over_default", "decode_grouped_dense")
    lt = j["decode_cublaslt_projections"]
    if [d["batch"] for d in lt] != [1]:
        fail(f"decode_cublaslt_projections batches: {lt}")
    positive(lt[0], "skinny_speedup", "decode_cublaslt_projections")
    one = j["decode_one_stream"]
    if [d["batch"] for d in one] != [1, 8]:
        fail(f"decode_one_stream batches: {one}")
    for d in one:
        positive(d, "overlap_speedup", f"decode_one_stream batch {d['batch']}")

    # The options this run measured faster, together: either the default's own, or an engine
    # of their own with the prefill, every decode batch and the targets.
    best = j["measured_best"]
    if set(best["options"]) != {"cublas_grouped_experts", "wgmma_experts", "grouped_dense_rows",
                                "skinny_rows", "overlap_shared_experts"}:
        fail(f"measured_best options: {best['options']}")
    if not best.get("same_as_default"):
        positive(best["prefill"], "speedup_over_default", "measured_best prefill")
        if [d["batch"] for d in best["decode"]] != [1, 8]:
            fail(f"measured_best decode batches: {best['decode']}")
        for d in best["decode"]:
            positive(d, "speedup_over_default", f"measured_best decode batch {d['batch']}")
        if not best["targets"]:
            fail("measured_best has no targets")

    fp8 = j["fp8"]
    for mode in ("block_scaled", "expand"):
        m = fp8[mode]
        if not 0 < m["weight_bytes_vs_bf16"] < 1:
            fail(f"fp8 {mode}: weight bytes {m['weight_bytes_vs_bf16']} of bf16's")
        positive(m["prefill"], "speedup_over_bf16", f"fp8 {mode} prefill")
        if sorted(d["batch"] for d in m["decode"]) != [1, 8]:
            fail(f"fp8 {mode}: decode batches {m['decode']}")
        for d in m["decode"]:
            positive(d, "speedup_over_bf16", f"fp8 {mode} decode batch {d['batch']}")
        # Some products ran on the FP8 weights, and `expand` never on the block-scaled product.
        k = m["kernels"]
        if k["fp8_block_scaled"] + k["fp8_expanded"] == 0 or \
                (mode == "expand" and k["fp8_block_scaled"] != 0):
            fail(f"fp8 {mode}: kernels {k}")

    # --wgmma-experts: the default engine's routed experts on wgmma (the Nsight pass's profile).
    w = run_bench(binary, ["--decode-batch", "1", "--check-tokens", "0", "--no-graphs",
                           "--no-variants", "--wgmma-experts"],
                  os.path.join(work, "bench_gpu_engine_wgmma.json"), 300, "--wgmma-experts")
    if not w.get("wgmma_experts") or w["kernels"]["experts_wgmma"] == 0 or \
            "prefill_wgmma_experts" in w:
        fail(f"--wgmma-experts: {w.get('kernels')}, keys {sorted(w)}")
    print(f"bench_smoke: every stage ran ({len(json.dumps(j))} bytes of JSON), and --wgmma-experts")


if __name__ == "__main__":
    main()
