#!/usr/bin/env python3
"""Routing golden for a DeepSeek-V3 fixture: which experts Hugging Face transformers picks.

Usage: make_routing_golden.py FIXTURE_DIR

FIXTURE_DIR is one of tests/data/{tiny-v3,small-v3-fp8}: a hub-style checkpoint (config.json,
model.safetensors with one tensor per expert, FP8 weights with `weight_scale_inv` where the
config has a `quantization_config`) plus golden.safetensors (`input_ids` int64 [B=2, S=16] and
the reference `logits`). Needs torch and transformers (made with transformers 5.17.0 and
torch 2.11.0, CPU); see shared/fixtures/make_fixtures.py, which made the fixtures.

What it does:
  1. Builds DeepseekV3ForCausalLM from config.json as make_fixtures.py does: the config without
     `quantization_config`, eager attention, float32, TF32 off.
  2. Loads model.safetensors, mapping hub names back to the transformers state: the per-expert
     `mlp.experts.{e}.{gate,up,down}_proj.weight` are fused into transformers 5's
     `mlp.experts.gate_up_proj` [E, 2*I, H] (gate rows first, then up) and
     `mlp.experts.down_proj` [E, H, I]. FP8 (float8_e4m3fn) weights are dequantised to float32:
     weight = fp8 value x `weight_scale_inv` of its 128x128 block (edge blocks partial).
  3. Runs the batch `input_ids` of golden.safetensors and checks the logits against the golden
     `logits`: max abs diff within 1e-4 (2e-3 for FP8 checkpoints). Prints the diff; exits 1
     without writing anything if it is over.
  4. Records, with a forward hook on every MoE layer's router (`DeepseekV3TopkRouter`, the
     module `model.layers.{i}.mlp.gate`, whose forward returns
     (router_logits, topk_weights, topk_indices)), and writes FIXTURE_DIR/routing.safetensors:
       topk_idx.{i}      int64   [B*S, top_k]   expert indices chosen for each token
       topk_weight.{i}   float32 [B*S, top_k]   their routing weights, as the experts use them
                                                (sigmoid scores without the bias, normalised
                                                when norm_topk_prob, times routed_scaling_factor)
       router_input.{i}  float32 [B*S, hidden]  the router's input: the post-attention-layernorm
                                                hidden state of layer i
     for each MoE layer i (i >= first_k_dense_replace). Rows are in batch-major token order:
     row = b*S + t (the router flattens [B, S, H] with view(-1, H)).

Order of the top_k columns: exactly as transformers returns them, which is the order of
`torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)` on CPU (torch 2.11). With
sorted=False torch does not promise any order, so the column order is NOT by score; the
weights are in the same column order as the indices (topk_weight[r, j] belongs to expert
topk_idx[r, j]). A consumer should compare the choices as sets (e.g. sort each row by
index, carrying the weights along), not column by column.

It also prints, per MoE layer, the routing margins: the smallest gap over the batch between
the top_k-th and (top_k+1)-th biased score (sigmoid + e_score_correction_bias) among the experts
of the chosen groups, and the smallest gap between the topk_group-th and (topk_group+1)-th
group score (how close any decision was to a tie).
"""
import json
import os
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


def build_model(cfg_dict):
    """DeepseekV3ForCausalLM from a hub config: eager attention, float32, no quantisation."""
    cfg_dict = dict(cfg_dict)
    cfg_dict.pop("quantization_config", None)
    cfg_dict["torch_dtype"] = "float32"
    cfg = transformers.DeepseekV3Config.from_dict(cfg_dict)
    cfg._attn_implementation = "eager"
    return transformers.DeepseekV3ForCausalLM(cfg).float().eval()


def dequantise(w, scale_inv, block):
    """float8 weight [R, C] x per-block float32 scale [ceil(R/br), ceil(C/bc)] -> float32."""
    R, C = w.shape
    br, bc = block
    s = scale_inv.float().repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[:R, :C]
    return w.float() * s


def read_hub(path, cfg_dict):
    """The checkpoint's tensors, hub names, FP8 weights dequantised to float32."""
    block = (cfg_dict.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    out = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for k in keys:
            if k.endswith("_scale_inv"):
                continue
            t = f.get_tensor(k)
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale = k + "_scale_inv"
                if scale not in keys:
                    raise SystemExit(f"{k} is FP8 but has no {scale}")
                t = dequantise(t, f.get_tensor(scale), block)
            out[k] = t.float()
    return out


def hub_to_state(hub, model):
    """Hub naming (one tensor per expert) -> transformers' state dict (fused experts)."""
    target = model.state_dict()
    state = {}
    fused = {}
    for k, v in hub.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            # model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
            pre, rest = k.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            fused.setdefault(pre, {}).setdefault(proj, {})[int(e)] = v
        else:
            state[k] = v
    for pre, projs in fused.items():
        n = len(projs["gate_proj"])
        gu_key = f"{pre}.mlp.experts.gate_up_proj"
        dn_key = f"{pre}.mlp.experts.down_proj"
        gu = torch.stack([torch.cat([projs["gate_proj"][e], projs["up_proj"][e]], 0) for e in range(n)])
        dn = torch.stack([projs["down_proj"][e] for e in range(n)])
        # transformers 5.17 stores [E, 2I, H] and [E, H, I]; transpose if a version differs
        if gu.shape != target[gu_key].shape:
            gu = gu.transpose(1, 2)
        if dn.shape != target[dn_key].shape:
            dn = dn.transpose(1, 2)
        state[gu_key] = gu.contiguous()
        state[dn_key] = dn.contiguous()
    return state


def main(fixture_dir):
    with open(os.path.join(fixture_dir, "config.json")) as f:
        cfg_dict = json.load(f)
    fp8 = "quantization_config" in cfg_dict
    tol = 2e-3 if fp8 else 1e-4

    model = build_model(cfg_dict)
    state = hub_to_state(read_hub(os.path.join(fixture_dir, "model.safetensors"), cfg_dict), model)
    res = model.load_state_dict(state, strict=False)
    # only the non-persistent rotary buffers may be absent; nothing may be left over
    missing = [k for k in res.missing_keys if "rotary_emb" not in k]
    if missing or res.unexpected_keys:
        raise SystemExit(f"state mismatch: missing {missing} unexpected {res.unexpected_keys}")
    model.eval()

    with safe_open(os.path.join(fixture_dir, "golden.safetensors"), "pt") as f:
        ids = f.get_tensor("input_ids")
        ref_logits = f.get_tensor("logits")
        ref_hidden = {k: f.get_tensor(k) for k in f.keys() if k.startswith("hidden_states.")}

    caught = {}

    def hook(i):
        def fn(mod, inp, out):
            _, weights, idx = out
            x = inp[0].detach()
            caught[i] = (mod, x.reshape(-1, x.shape[-1]).float().clone(),
                         idx.detach().to(torch.int64).clone(), weights.detach().float().clone())
        return fn

    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE):
            hooks.append(layer.mlp.gate.register_forward_hook(hook(i)))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()

    diff = (out.logits.float() - ref_logits).abs().max().item()
    print(f"{fixture_dir}: transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"logits max abs diff vs golden: {diff:.3e} (tolerance {tol:g})")
    for j, h in enumerate(out.hidden_states):
        k = f"hidden_states.{j}"
        if k in ref_hidden:
            print(f"  {k} max abs diff: {(h.float() - ref_hidden[k]).abs().max().item():.3e}")
    if not diff <= tol:
        print("FAILED: logits do not match the golden; routing.safetensors not written")
        return 1

    B, S = ids.shape
    top_k = cfg_dict["num_experts_per_tok"]
    G, TG = cfg_dict["n_group"], cfg_dict["topk_group"]
    tensors = {}
    for i in sorted(caught):
        mod, x, idx, w = caught[i]
        assert x.shape == (B * S, cfg_dict["hidden_size"]) and idx.shape == (B * S, top_k)
        tensors[f"topk_idx.{i}"] = idx.contiguous()
        tensors[f"topk_weight.{i}"] = w.contiguous()
        tensors[f"router_input.{i}"] = x.contiguous()

        # margins, recomputed from the captured input as the router does
        with torch.no_grad():
            s = torch.sigmoid(x @ mod.weight.float().t()) + mod.e_score_correction_bias.float()
            E = s.shape[-1]
            gs = s.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
            gsrt = gs.sort(dim=-1, descending=True)[0]
            ggap = (gsrt[:, TG - 1] - gsrt[:, TG]).min().item() if TG < G else float("inf")
            gidx = gs.topk(TG, dim=-1)[1]
            mask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()
            mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            m = s.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True)
            egap = (m[0][:, top_k - 1] - m[0][:, top_k]).min().item()
            same = torch.equal(m[1][:, :top_k].sort(-1)[0], idx.sort(-1)[0])
            desc = bool((s.gather(1, idx).diff(dim=-1) <= 0).all())
        print(f"  layer {i}: min gap k-th vs (k+1)-th biased expert score {egap:.6g}; "
              f"min gap group {TG}-th vs {TG + 1}-th {ggap:.6g}; "
              f"hooked top-k == recomputed top-k (as sets): {same}; "
              f"columns in descending biased score in every row: {desc}")

    path = os.path.join(fixture_dir, "routing.safetensors")
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "rows": "batch-major: row = b*seq_len + t",
            "topk_order": "as returned by torch.topk(sorted=False) in DeepseekV3TopkRouter (CPU); "
                          "unspecified, compare as sets"}
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes): " +
          ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in tensors.items()))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1])
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
