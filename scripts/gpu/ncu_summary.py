#!/usr/bin/env python3
"""Where the GPU engine's time goes, from device_checks.sh's Nsight Compute log.

The log (ncu_engine.log: `ncu --csv --metrics gpu__time_duration.sum` over moe_bench_gpu_engine
--reps 1 --decode-steps 2) holds one row per kernel launch. Every forward pass ends with the
greedy sampling kernel, which splits the launches into passes; the bench runs them in a known
order (three prefills, then for each decode batch twice: a prefill and two decode steps). For
the last prefill and each batch's last decode step this prints each kernel family's time, its
share and its launch count, as JSON.

    ncu_summary.py ncu_engine.log [--decode-batches 1,32]
"""
import argparse
import csv
import json
import sys

# ncu spells the unit "ns" (or "nsecond" in older versions).
UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}

# Kernel families by a substring of the demangled name, first match wins.
FAMILIES = [
    ("grouped_gemm_wgmma", "grouped expert GEMM (wgmma)"),
    ("grouped_gemm_tma", "grouped expert GEMM (wgmma, TMA)"),
    ("grouped_gemm", "grouped expert GEMM"),
    ("mla_decode", "MLA decode"),
    ("mla_prefill", "MLA prefill"),
    ("mla_cache_append", "cache append"),
    ("moe_gate_plan", "gate + permute plan"),
    ("moe_gate", "gate"),
    ("permute", "permute/unpermute"),
    ("small_plan_kernel", "permute plan"),
    ("count_kernel", "permute plan"),
    ("scan_kernel", "permute plan"),
    ("place_kernel", "permute plan"),
    ("rmsnorm", "RMSNorm"),
    ("rope", "RoPE"),
    ("swiglu", "SwiGLU"),
    ("gather_rows", "gather"),
    ("convert", "convert"),
    ("sample_greedy", "sampling"),
    ("sample_kernel", "sampling"),
    ("skinny_linear", "few-row linear"),
]


def family(name):
    for key, label in FAMILIES:
        if key in name:
            return label
    # cuBLASLt's kernels, and cuBLAS's (its grouped GEMM, with cublas_grouped_experts).
    return "cuBLASLt" if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "splitK")) else "other: " + name[:60]


def launches(path):
    rows = []
    with open(path, errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        rows.append((r["Kernel Name"], value * UNITS.get(r["Metric Unit"], 1.0)))
    return rows


def split_passes(rows):
    passes, current = [], []
    for name, us in rows:
        current.append((name, us))
        if "sample_greedy" in name:
            passes.append(current)
            current = []
    return passes


def summarise(launches_of_pass):
    total = sum(us for _, us in launches_of_pass)
    fams = {}
    for name, us in launches_of_pass:
        f = fams.setdefault(family(name), {"us": 0.0, "launches": 0})
        f["us"] += us
        f["launches"] += 1
    for f in fams.values():
        f["share"] = f["us"] / total if total else 0.0
    ordered = dict(sorted(fams.items(), key=lambda kv: -kv[1]["us"]))
    return {"kernel_us": total, "launches": len(launches_of_pass), "families": ordered}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--decode-batches", default="1,32")
    args = ap.parse_args()
    passes = split_passes(launches(args.log))
    out = {"passes_found": len(passes)}
    if len(passes) >= 3:
        out["prefill"] = summarise(passes[2])
    for i, b in enumerate(int(x) for x in args.decode_batches.split(",")):
        # Passes per batch: (prefill, decode, decode) twice; the second run's last decode step.
        last = 3 + 6 * i + 5
        if last < len(passes):
            out[f"decode_b{b}"] = summarise(passes[last])
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
