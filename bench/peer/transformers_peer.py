#!/usr/bin/env python3
"""The reference implementation's speed on the same GPU, for side-by-side ratios.

Hugging Face transformers' DeepseekV3 (bf16, sdpa attention, its default experts path) on the
model `moe init-model --preset v2lite-8L --config-only` describes, with random weights (speed
does not depend on their values): prefill of --prefill-batch sequences of --prefill-len tokens,
and greedy decode at batch 1 and 32 after a --context-token prompt. Times are medians of
CUDA-synchronised wall times. Prints one JSON object (also to --out).

Runs on the GPU machine only (torch with CUDA); never in CI.
"""
import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="config.json of the model")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--experts", default=None,
                    help="experts_implementation to ask for (default: transformers' own)")
    args = ap.parse_args()

    result = {"peer": "transformers"}
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # the GPU machine has them; elsewhere say why
        result["skipped"] = f"import failed: {e}"
        emit(result, args.out)
        return 2
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device"
        emit(result, args.out)
        return 2
    result.update(torch=torch.__version__, transformers=transformers.__version__,
                  device=torch.cuda.get_device_name(0))

    cfg = AutoConfig.from_pretrained(args.config)
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}  # transformers 5: `dtype`
    if args.experts:
        kwargs["experts_implementation"] = args.experts
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    model.eval()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["experts_implementation"] = getattr(model.config, "_experts_implementation", None) or args.experts
    vocab = cfg.vocab_size

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    with torch.inference_mode():
        ids = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), device="cuda")
        for _ in range(2):
            model(ids, use_cache=False)
        times = [timed(lambda: model(ids, use_cache=False))[0] for _ in range(args.reps)]
        s = statistics.median(times)
        result["prefill"] = {"batch": args.prefill_batch, "len": args.prefill_len, "seconds": s,
                             "tokens_per_s": args.prefill_batch * args.prefill_len / s}

        result["decode"] = []
        for batch in (1, 32):
            prompt = torch.randint(0, vocab, (batch, args.context), device="cuda")

            def decode():
                out = model(prompt, use_cache=True)
                cache = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.decode_steps):
                    out = model(tok, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                return time.perf_counter() - t

            decode()
            s = statistics.median(decode() for _ in range(max(1, args.reps // 2)))
            result["decode"].append({"batch": batch, "context": args.context, "steps": args.decode_steps,
                                     "ms_per_token": 1e3 * s / args.decode_steps,
                                     "tokens_per_s": batch * args.decode_steps / s})
    emit(result, args.out)
    return 0


def emit(result, path):
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
