#!/usr/bin/env bash
# Contracts of `moe run`, `moe init-model` and `moe demo` as a user (or a comparison script)
# sees them: real processes, real files, only stdout/stderr/exit status checked.
#
#   run_contracts.sh MOE_BINARY TESTS_DATA_DIR CASE
#
# Each CASE is registered as its own ctest test (tests/cli/CMakeLists.txt), so one broken
# contract shows up by name instead of hiding the others.
#
# Conventions the cases hold the product to:
#   * a crash (exit status >= 128: killed by a signal, abort, sanitizer) always fails a case,
#     even where a non-zero exit is expected: a refused input must be refused, not crash;
#   * a "clear error" is exit status 1 and a `moe <cmd>: error: ...` line on stderr that names
#     the problem (the tensor, the file, the config key), so a user can act on it.
#
# Safetensors files are read and rewritten with python3's standard library only (struct, json,
# array): numpy is not a dependency of the test suite.
set -u

if [[ $# -ne 3 ]]; then
  echo "usage: $0 MOE_BINARY TESTS_DATA_DIR CASE" >&2
  exit 2
fi
MOE=$1
DATA=$2
CASE=$3
TINY=$DATA/tiny-v3
GOLDEN=$TINY/golden.safetensors

TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-cli-contracts.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------------------------------------
# Harness. Checks record a failure and go on, so one run reports every broken part of a case.

FAILURES=0
fail() {
  echo "FAIL [$CASE]: $*" >&2
  FAILURES=$((FAILURES + 1))
}

# moe ARGS...: runs the binary; leaves stdout in $TMP/out, stderr in $TMP/err, status in RC.
# The command line is kept for failure messages.
RC=0
LAST_CMD=
moe() {
  LAST_CMD="moe $*"
  "$MOE" "$@" >"$TMP/out" 2>"$TMP/err"
  RC=$?
}

show_last() {
  echo "  command: $LAST_CMD" >&2
  echo "  exit status: $RC" >&2
  echo "  stdout: $(head -c 2000 "$TMP/out")" >&2
  echo "  stderr: $(head -c 2000 "$TMP/err")" >&2
}

# A crash is never an acceptable answer, whatever else the case expects.
check_no_crash() {
  if ((RC >= 128)); then
    fail "crashed (exit status $RC = 128 + signal $((RC - 128)))"
    show_last
    return 1
  fi
}

expect_success() {
  check_no_crash || return 1
  if ((RC != 0)); then
    fail "expected success"
    show_last
    return 1
  fi
}

# stderr_mentions NEEDLE...: every NEEDLE (fixed strings) is in stderr; a failure for each one
# that is not.
stderr_mentions() {
  local needle ok=1
  for needle in "$@"; do
    if ! grep -qF -- "$needle" "$TMP/err"; then
      fail "stderr does not mention '$needle'"
      ok=0
    fi
  done
  ((ok))
}

# expect_clear_error CMD NEEDLE...: exit 1, the `moe CMD: error:` prefix, and every NEEDLE
# (fixed strings) in stderr.
expect_clear_error() {
  local cmd=$1
  shift
  check_no_crash || return 1
  local ok=1
  if ((RC != 1)); then
    fail "expected exit status 1"
    ok=0
  fi
  if ! grep -qF "moe $cmd: error:" "$TMP/err"; then
    fail "stderr lacks the 'moe $cmd: error:' prefix"
    ok=0
  fi
  stderr_mentions "$@" || ok=0
  ((ok)) || show_last
  ((ok))
}

# Argument errors come from the option parser, whose exit status is its own (non-zero, small):
# only "refused, did not crash, said something" is part of the contract.
expect_refused() {
  check_no_crash || return 1
  if ((RC == 0)); then
    fail "expected a non-zero exit status"
    show_last
    return 1
  fi
  if [[ ! -s $TMP/err ]]; then
    fail "refused without saying why on stderr"
    show_last
    return 1
  fi
}

# expect_refused_saying NEEDLE...: expect_refused, and every NEEDLE (fixed strings) in stderr.
expect_refused_saying() {
  expect_refused || return 1
  stderr_mentions "$@" || { show_last; return 1; }
}

# ---------------------------------------------------------------------------------------------
# Safetensors helper: the file format is 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the data. The helper reads
# tensors out and writes edited copies (always re-laid-out, so offsets stay consistent and only
# the edit under test is wrong).
cat >"$TMP/st.py" <<'PY'
import array, json, struct, sys

def load(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    return header, blob[8 + n:]

def tensor_bytes(header, data, name):
    begin, end = header[name]["data_offsets"]
    return data[begin:end]

def save(path, header, tensors):
    """header: name -> {dtype, shape} (+ optional __metadata__); tensors: name -> bytes."""
    out_header, chunks, offset = {}, [], 0
    if "__metadata__" in header:
        out_header["__metadata__"] = header["__metadata__"]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        raw = tensors[name]
        out_header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                            "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(out_header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))

def all_tensors(header, data):
    return {k: tensor_bytes(header, data, k) for k in header if k != "__metadata__"}

def int64_row(path, name, row):
    header, data = load(path)
    shape = header[name]["shape"]
    assert header[name]["dtype"] == "I64", header[name]
    values = array.array("q", tensor_bytes(header, data, name))
    cols = shape[-1]
    return list(values[row * cols:(row + 1) * cols])

cmd, args = sys.argv[1], sys.argv[2:]

if cmd == "ints":  # ints FILE TENSOR ROW SEP: one row of an int64 tensor
    path, name, row, sep = args
    print(sep.join(str(v) for v in int64_row(path, name, int(row))))

elif cmd == "compare-logits":  # compare-logits DUMP GOLDEN ROW TOL
    dump_path, golden_path, row, tol = args[0], args[1], int(args[2]), float(args[3])
    dh, dd = load(dump_path)
    gh, gd = load(golden_path)
    problems = []
    entry = dh.get("logits")
    if entry is None:
        sys.exit("dump has no tensor 'logits' (has: %s)" % sorted(dh))
    _, seq, vocab = gh["logits"]["shape"]
    if entry["dtype"] != "F32":
        problems.append("dtype %s, expected F32" % entry["dtype"])
    if entry["shape"] != [1, seq, vocab]:
        problems.append("shape %s, expected %s" % (entry["shape"], [1, seq, vocab]))
    begin, end = entry["data_offsets"]
    if end - begin != seq * vocab * 4 or len(dd) < end:
        problems.append("data_offsets %s do not hold %d floats (data is %d bytes)"
                        % (entry["data_offsets"], seq * vocab, len(dd)))
    if problems:
        sys.exit("; ".join(problems))
    got = array.array("f", tensor_bytes(dh, dd, "logits"))
    want = array.array("f", tensor_bytes(gh, gd, "logits"))[row * seq * vocab:(row + 1) * seq * vocab]
    worst, where = 0.0, 0
    for i, (a, b) in enumerate(zip(got, want)):
        d = abs(a - b)
        if not d <= worst:  # also catches NaN
            worst, where = d, i
            if d != d:
                break
    if not worst <= tol:
        sys.exit("max |dump - golden| = %g at position %d, vocab %d (dump %g, golden %g), tol %g"
                 % (worst, where // vocab, where % vocab, got[where], want[where], tol))
    print("max |dump - golden| = %g" % worst)

elif cmd == "set-shape":  # set-shape SRC DST TENSOR D0,D1,...: same bytes, another shape
    src, dst, name, dims = args
    header, data = load(src)
    tensors = all_tensors(header, data)
    header[name]["shape"] = [int(d) for d in dims.split(",")]
    save(dst, header, tensors)

elif cmd == "drop":  # drop SRC DST TENSOR
    src, dst, name = args
    header, data = load(src)
    tensors = all_tensors(header, data)
    del header[name], tensors[name]
    save(dst, header, tensors)

elif cmd == "add-copy":  # add-copy SRC DST NEW_NAME LIKE: a new tensor copying LIKE's bytes
    src, dst, new, like = args
    header, data = load(src)
    tensors = all_tensors(header, data)
    header[new] = dict(header[like])
    tensors[new] = tensors[like]
    save(dst, header, tensors)

elif cmd == "rope-type":  # rope-type SRC_CONFIG DST_CONFIG TYPE
    src, dst, kind = args
    with open(src) as f:
        config = json.load(f)
    config["rope_scaling"]["type"] = kind
    config["rope_scaling"]["rope_type"] = kind
    with open(dst, "w") as f:
        json.dump(config, f, indent=2)

else:
    sys.exit("st.py: unknown command " + cmd)
PY
st() { python3 "$TMP/st.py" "$@"; }

# A private copy of tiny-v3 (config + weights), for cases that damage one file of it.
copy_tiny() {
  local dir=$TMP/$1
  mkdir -p "$dir"
  cp "$TINY/config.json" "$TINY/model.safetensors" "$dir/"
  echo "$dir"
}

# Greedy ids as `moe run` prints them: one line, single spaces.
is_id_line() {  # is_id_line LINE COUNT VOCAB
  local line=$1 count=$2 vocab=$3 ids id
  read -r -a ids <<<"$line"
  [[ $line == "${ids[*]}" ]] || return 1
  ((${#ids[@]} == count)) || return 1
  for id in "${ids[@]}"; do
    [[ $id =~ ^[0-9]+$ ]] && ((id < vocab)) || return 1
  done
}

# ---------------------------------------------------------------------------------------------
# Cases.

# The golden greedy continuation (from transformers) is the end-to-end proof that config
# parsing, weight loading, every block and greedy decoding agree with the reference.
case_greedy_reproduces_tiny_v3() {
  local prompt want
  prompt=$(st ints "$GOLDEN" greedy_prompt 0 ,) || { fail "cannot read greedy_prompt"; return; }
  want=$(st ints "$GOLDEN" greedy_tokens 0 " ") || { fail "cannot read greedy_tokens"; return; }
  moe run --model "$TINY" --prompt-ids "$prompt" --max-new-tokens 16
  expect_success || return
  local got
  got=$(cat "$TMP/out")
  if [[ $got != "$want" ]]; then
    fail "greedy tokens differ"
    echo "  want: $want" >&2
    echo "  got:  $got" >&2
  fi
}

# --dump-logits is how other implementations are compared against this one: the file format
# (F32, [1, T, vocab]) is as much the contract as the numbers.
case_dump_logits_matches_golden() {
  local prompt
  prompt=$(st ints "$GOLDEN" input_ids 0 ,) || { fail "cannot read input_ids"; return; }
  moe run --model "$TINY" --prompt-ids "$prompt" --max-new-tokens 0 --dump-logits "$TMP/logits.safetensors"
  expect_success || return
  if [[ ! -s $TMP/logits.safetensors ]]; then
    fail "no logits file written"
    return
  fi
  local why
  why=$(st compare-logits "$TMP/logits.safetensors" "$GOLDEN" 0 1e-4 2>&1) || fail "$why"
  # With no tokens to generate, nothing but the (empty) id line belongs on stdout.
  if [[ -n $(tr -d '[:space:]' <"$TMP/out") ]]; then
    fail "--max-new-tokens 0 printed ids: $(cat "$TMP/out")"
  fi
}

# Seeded sampling must be a pure function of (model, prompt, options, seed): runs are compared
# across machines and versions.
case_sampling_is_reproducible() {
  local n=16
  # shellcheck disable=SC2054  # the commas are inside one argument, the prompt
  local args=(--model "$TINY" --prompt-ids 5,17,42 --max-new-tokens "$n")
  local first second other
  moe run "${args[@]}" --temperature 1.0 --seed 7
  expect_success || return
  first=$(cat "$TMP/out")
  is_id_line "$first" "$n" 512 || fail "expected $n ids in [0, 512) on one line, got '$first'"
  moe run "${args[@]}" --temperature 1.0 --seed 7
  expect_success || return
  second=$(cat "$TMP/out")
  [[ $first == "$second" ]] || fail "same seed, different tokens: '$first' vs '$second'"
  # 16 draws over a 512-token vocabulary at temperature 1: two seeds agreeing on all of them
  # means the seed is ignored.
  moe run "${args[@]}" --temperature 1.0 --seed 8
  expect_success || return
  other=$(cat "$TMP/out")
  is_id_line "$other" "$n" 512 || fail "expected $n ids in [0, 512) on one line, got '$other'"
  [[ $first != "$other" ]] || fail "seeds 7 and 8 gave the same tokens: '$first'"
  # Truncated sampling (top-k and top-p together) is seeded the same way.
  moe run "${args[@]}" --temperature 0.8 --top-k 50 --top-p 0.9 --seed 3
  expect_success || return
  first=$(cat "$TMP/out")
  moe run "${args[@]}" --temperature 0.8 --top-k 50 --top-p 0.9 --seed 3
  expect_success || return
  [[ $first == "$(cat "$TMP/out")" ]] || fail "top-k/top-p: same seed, different tokens"
  is_id_line "$first" "$n" 512 || fail "top-k/top-p: expected $n ids in [0, 512), got '$first'"
}

# An id past the embedding table would read out of bounds; it must be refused up front.
case_prompt_id_outside_vocab() {
  moe run --model "$TINY" --prompt-ids 5,17,512 --max-new-tokens 4
  expect_clear_error run "outside the vocabulary" "512"
  moe run --model "$TINY" --prompt-ids 5,-3,17 --max-new-tokens 4
  expect_clear_error run "-3"
  # Past int32 (the engine's token type): must not wrap around into a valid id.
  moe run --model "$TINY" --prompt-ids 5,4294967301 --max-new-tokens 4
  expect_clear_error run "4294967301"
}

# A partially copied checkpoint is the most common broken download; the message must say
# which file, so the user knows what to fetch again.
case_truncated_safetensors() {
  local dir size
  dir=$(copy_tiny truncated_half)
  size=$(stat -c %s "$dir/model.safetensors")
  truncate -s $((size / 2)) "$dir/model.safetensors"
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.safetensors"
  # 5 bytes: not even the 8-byte header length is there.
  dir=$(copy_tiny truncated_5)
  truncate -s 5 "$dir/model.safetensors"
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.safetensors"
  # Header intact, but it claims more header than the file holds (cut inside the JSON).
  dir=$(copy_tiny truncated_header)
  truncate -s 1000 "$dir/model.safetensors"
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.safetensors"
}

# The byte count still matches (16*64 == 32*32), so only a shape check against the config can
# catch it; silently reinterpreting the bytes would produce garbage without an error.
case_wrong_shape() {
  local dir
  dir=$(copy_tiny wrong_shape)
  st set-shape "$TINY/model.safetensors" "$dir/model.safetensors" \
    model.layers.1.mlp.gate.weight 32,32 || { fail "cannot rewrite the checkpoint"; return; }
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.layers.1.mlp.gate.weight"
  # Transposed (same dims, swapped): the classic export bug.
  st set-shape "$TINY/model.safetensors" "$dir/model.safetensors" \
    model.layers.1.mlp.gate.weight 64,16 || { fail "cannot rewrite the checkpoint"; return; }
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.layers.1.mlp.gate.weight"
}

# An unknown RoPE variant must not fall back to plain RoPE: that would run and be wrong.
case_unknown_rope_type() {
  local dir
  dir=$(copy_tiny rope)
  st rope-type "$TINY/config.json" "$dir/config.json" foo || { fail "cannot rewrite config"; return; }
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "rope_scaling" "foo"
}

# Checkpoint and config must agree on the tensor set exactly, both ways: a missing expert would
# otherwise be zeros, an extra tensor a sign that the config is for another model.
case_missing_tensor() {
  local dir name=model.layers.2.mlp.experts.7.up_proj.weight
  dir=$(copy_tiny missing)
  st drop "$TINY/model.safetensors" "$dir/model.safetensors" "$name" ||
    { fail "cannot rewrite the checkpoint"; return; }
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "$name"
}

case_unexpected_tensor() {
  local dir
  dir=$(copy_tiny unexpected)
  # One expert past n_routed_experts = 16: what a checkpoint for a wider model looks like.
  st add-copy "$TINY/model.safetensors" "$dir/model.safetensors" \
    model.layers.1.mlp.experts.16.up_proj.weight model.layers.1.mlp.experts.0.up_proj.weight ||
    { fail "cannot rewrite the checkpoint"; return; }
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.layers.1.mlp.experts.16.up_proj.weight"
  # A name no DeepSeek checkpoint has.
  st add-copy "$TINY/model.safetensors" "$dir/model.safetensors" \
    model.no_such_module.weight model.norm.weight || { fail "cannot rewrite the checkpoint"; return; }
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "model.no_such_module.weight"
}

case_missing_model_dir() {
  local dir=$TMP/no/such/model
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "$dir"
  # A directory that exists but holds no checkpoint.
  mkdir -p "$TMP/empty"
  moe run --model "$TMP/empty" --prompt-ids 5,17,42 --max-new-tokens 4
  expect_clear_error run "$TMP/empty"
}

# What init-model writes must be loadable by run, with no hand edits in between.
case_init_model_tiny_round_trip() {
  local dir=$TMP/x
  moe init-model --preset tiny --out "$dir" --seed 3
  expect_success || return
  moe run --model "$dir" --prompt-ids 5,17,42 --max-new-tokens 6
  expect_success || return
  local vocab
  vocab=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$dir/config.json") ||
    { fail "init-model wrote no readable config.json"; return; }
  is_id_line "$(cat "$TMP/out")" 6 "$vocab" || fail "expected 6 ids in [0, $vocab), got '$(cat "$TMP/out")'"
  # bf16 checkpoints go through the same loader path with conversion.
  moe init-model --preset tiny --out "$TMP/x-bf16" --dtype bf16
  expect_success || return
  moe run --model "$TMP/x-bf16" --prompt-ids 5,17,42 --max-new-tokens 6
  expect_success && { is_id_line "$(cat "$TMP/out")" 6 "$vocab" || fail "bf16: expected 6 ids, got '$(cat "$TMP/out")'"; }
  # An unknown preset: the message names it, or lists the presets there are.
  moe init-model --preset no-such-preset --out "$TMP/y"
  check_no_crash || return
  if ((RC != 1)) || ! grep -qF "moe init-model: error:" "$TMP/err" ||
     ! grep -qE "no-such-preset|tiny" "$TMP/err"; then
    fail "unknown preset: expected exit 1 and an error naming the preset or listing presets"
    show_last
  fi
}

# The demo is the first thing a new user runs; it must work from nothing.
case_demo_runs() {
  # The demo writes the embedded default model into the model cache on first use.
  MOE_MODEL_CACHE="$TMP/cache" moe demo
  expect_success || return
  local want
  for want in "placement" "generations (6 requests submitted concurrently through the API" \
              "tokens routed per expert" "metrics: http://127.0.0.1:"; do
    grep -qF "$want" "$TMP/out" || { fail "demo output lacks '$want'"; show_last; }
  done
  [[ -f "$TMP/cache/tiny-seed0/config.json" ]] || fail "demo did not write its model to the cache"
  # It trains first: the loss falls from noise (ln 512 = 6.2) to well below, and greedy text
  # afterwards is bytes of text, not escapes of random ids.
  grep -qF "trained 120 steps" "$TMP/out" || { fail "demo did not report its training"; show_last; }
  local first last
  read -r first last < <(sed -n 's/^  loss: \([0-9.]*\) (first [0-9]* steps) -> \([0-9.]*\) (last [0-9]*)$/\1 \2/p' "$TMP/out")
  awk -v a="${first:-0}" -v b="${last:-9}" 'BEGIN { exit !(a > 5.5 && b < 3.0) }' ||
    fail "demo training: expected the loss to fall from above 5.5 to below 3.0, got '${first:-?}' -> '${last:-?}'"
  grep -F 'after training, greedy:' "$TMP/out" | grep -qvE '\\x|<[0-9]+>' ||
    fail "demo: greedy text after training still has non-text tokens: $(grep -F 'after training' "$TMP/out")"
  # A second run reuses the model it wrote and generates the same greedy tokens.
  cp "$TMP/out" "$TMP/first_out"
  MOE_MODEL_CACHE="$TMP/cache" moe demo
  expect_success || return
  grep -F "[0] greedy" "$TMP/out" >"$TMP/second_line"
  grep -F "[0] greedy" "$TMP/first_out" | cmp -s - "$TMP/second_line" ||
    fail "the demo's greedy generation changed between runs"
}

# `moe demo --processes N` killed outright (SIGKILL: no destructor of its runs) takes its node
# processes with it: the kernel sends each SIGTERM when the demo ends. Before, a demo killed, or
# ended by Ctrl-C or a closed output pipe, left every node running.
case_demo_nodes_end_with_it() {
  MOE_MODEL_CACHE="$TMP/cache" "$MOE" demo --processes 3 >"$TMP/out" 2>"$TMP/err" &
  local demo=$! dir="" i
  # Bounded by the nodes' start-up; the demo says where they run as soon as they are started.
  for ((i = 0; i < 600; i++)); do
    dir=$(sed -n 's/^started [0-9]* node processes (logs in \(.*\))$/\1/p' "$TMP/out")
    [[ -n $dir ]] && break
    sleep 0.1
  done
  if [[ -z $dir ]]; then
    fail "the demo did not say where its nodes run: $(head -c 2000 "$TMP/out") $(head -c 2000 "$TMP/err")"
    kill -9 "$demo"
    return
  fi
  # Both nodes running their own command line (forked, the line is printed; exec may follow).
  local count=0
  for ((i = 0; i < 300 && count != 2; i++)); do
    count=$(pgrep -f -- "$dir/cluster.yaml" | wc -l)
    ((count == 2)) || sleep 0.1
  done
  ((count == 2)) || fail "expected 2 node processes of $dir, found $count"
  kill -9 "$demo"
  wait "$demo" 2>/dev/null
  for ((i = 0; i < 300; i++)); do
    pgrep -f -- "$dir/cluster.yaml" >/dev/null || break
    sleep 0.1
  done
  if pgrep -f -- "$dir/cluster.yaml" >/dev/null; then
    fail "node processes still run 30 s after the demo was killed: $(pgrep -af -- "$dir/cluster.yaml")"
    pkill -9 -f -- "$dir/cluster.yaml"
  fi
  rm -rf "$dir"
}

# `moe train --config --data`: training through a cluster's actors from a text file, a training
# checkpoint that serving loads, and clear errors for bad input.
case_train_config_data() {
  local config="$DATA/../../deploy/local.yaml" corpus="$DATA/corpus/apache-2.0.txt"
  MOE_MODEL_CACHE="$TMP/cache" moe train --config "$config" --data "$corpus" --steps 12 --seq-len 32 --batch 4 \
    --lr 3e-3 --save "$TMP/ckpt"
  expect_success || return
  grep -qF "trained 12 steps" "$TMP/out" || { fail "no training summary"; show_last; }
  grep -qE "^train: step 12/12 " "$TMP/err" || { fail "no progress lines on stderr"; show_last; }
  [[ -f "$TMP/ckpt/training_state.json" && -f "$TMP/ckpt/model.safetensors" ]] ||
    { fail "--save wrote no training checkpoint"; show_last; return; }
  grep -q '"step": 12' "$TMP/ckpt/training_state.json" || fail "the checkpoint does not record 12 steps"
  moe run --model "$TMP/ckpt" --prompt-ids 76,105,99 --max-new-tokens 4
  expect_success || { fail "the trained checkpoint does not serve"; return; }
  # The single-process check contract resumes the cluster's checkpoint (optimizer state, step).
  moe train --model "$TMP/ckpt" --batch-ids "$GOLDEN" --steps 1 --print-losses
  expect_success || fail "the single-process trainer does not resume the cluster's checkpoint"
  # Bad input: a missing corpus, flags of the other mode, a corpus shorter than one sequence.
  MOE_MODEL_CACHE="$TMP/cache" moe train --config "$config" --data "$TMP/no-such-file.txt"
  check_no_crash || return
  ((RC == 1)) && grep -qF "no-such-file.txt" "$TMP/err" || { fail "missing corpus: expected exit 1 naming the file"; show_last; }
  MOE_MODEL_CACHE="$TMP/cache" moe train --config "$config" --data "$corpus" --batch-ids "$GOLDEN"
  check_no_crash || return
  ((RC == 1)) && grep -qF "check contract" "$TMP/err" || { fail "mixed modes: expected exit 1 explaining the two modes"; show_last; }
  printf 'short' >"$TMP/short.txt"
  MOE_MODEL_CACHE="$TMP/cache" moe train --config "$config" --data "$TMP/short.txt" --seq-len 64
  check_no_crash || return
  ((RC == 1)) && grep -qF "fewer than one sequence" "$TMP/err" || { fail "short corpus: expected exit 1 and why"; show_last; }
}

case_bad_cli_arguments() {
  # shellcheck disable=SC2054  # the commas are inside one argument, the prompt
  local base=(--model "$TINY" --prompt-ids 5,17,42)
  # Each refusal names the flag, the value and what is expected, in words (CLI11's own range
  # checks printed "not in range 0.000000 to 1797693134862315708...", 309 digits).
  moe run "${base[@]}" --max-new-tokens -1
  expect_refused_saying "--max-new-tokens: -1 is not a whole number >= 0"
  moe run "${base[@]}" --max-new-tokens 1.5
  expect_refused_saying "--max-new-tokens: '1.5' is not a whole number >= 0"
  moe run "${base[@]}" --max-new-tokens 4 --top-p 2
  expect_refused_saying "--top-p: 2 is not a number in (0, 1]"
  moe run "${base[@]}" --max-new-tokens 4 --top-p 0
  expect_refused_saying "--top-p: 0 is not a number in (0, 1]"
  moe run "${base[@]}" --max-new-tokens 4 --temperature -1
  expect_refused_saying "--temperature: -1 is not a finite number >= 0"
  moe run "${base[@]}" --max-new-tokens 4 --temperature nan
  expect_refused_saying "--temperature: nan is not a finite number >= 0"
  moe run "${base[@]}" --max-new-tokens 4 --top-k -5
  expect_refused_saying "--top-k: -5 is not a whole number in [0, 4294967295]"
  if grep -qF "0.000000" "$TMP/err"; then
    fail "a bound printed with %f"
    show_last
  fi
  # Timeouts: a negative one was taken as given ("not up after -5s", after starting the node).
  local config="$DATA/../../deploy/local.yaml" run_dir="$TMP/run"
  moe cluster up --config "$config" --run-dir "$run_dir" --timeout -5
  expect_refused_saying "--timeout: -5 is not a number in (0, 1000000]"
  [[ -e $run_dir ]] && fail "cluster up with a refused --timeout created $run_dir"
  moe cluster status --config "$config" --run-dir "$run_dir" --call-timeout 0
  expect_refused_saying "--call-timeout: 0 is not a number in (0, 1000000]"
  moe serve --config "$config" --join-nodes --join-timeout 1e300
  expect_refused_saying "--join-timeout: 1e300 is not a number in (0, 1000000]"
  moe serve --config "$config" --api-port 70000
  expect_refused_saying "--api-port: 70000 is not a whole number in [0, 65535]"
  # Expert-parallel engine shards: GPU engine shards only, and a group of at least one GPU.
  moe serve --config "$config" --expert-parallel 0
  expect_refused_saying "--expert-parallel: 0 is not a whole number in [1, 1024]"
  moe serve --config "$config" --expert-parallel 2
  expect_clear_error serve "--expert-parallel choose whole-model engine shards"
  moe serve --config "$config" --engine reference --expert-parallel 2
  expect_clear_error serve "--expert-parallel are for --engine gpu"
  moe serve --config "$config" --engine gpu --expert-parallel-recv-rows 64
  expect_clear_error serve "--expert-parallel-recv-rows sizes the expert exchange of --expert-parallel groups"
  moe serve --config "$config" --engine gpu --expert-parallel 4 --expert-parallel-recv-rows 3
  expect_clear_error serve "--expert-parallel-recv-rows 3: at least a row for each of the group's 4 GPUs"
  moe serve --config "$config" --expert-parallel-recv-rows -1
  expect_refused_saying "--expert-parallel-recv-rows: -1 is not a whole number in [0, 2147483647]"
  moe submit --address 127.0.0.1:9 --secret s --prompt-ids 5 --deadline-ms -5
  expect_refused_saying "--deadline-ms: -5 is not a whole number >= 0"
  # Seeds: CLI11 alone read -1 as 2^64 - 1 and went on.
  moe run "${base[@]}" --max-new-tokens 4 --seed -1
  expect_refused_saying "--seed: -1 is not a whole number in [0, 18446744073709551615]"
  moe init-model --preset tiny --config-only --out "$TMP/seeded" --seed -1
  expect_refused_saying "--seed: -1 is not a whole number in [0, 18446744073709551615]"
  [[ -e $TMP/seeded ]] && fail "init-model with a refused --seed wrote $TMP/seeded"
  moe init-model --preset tiny --config-only --out "$TMP/seeded" --seed 18446744073709551615
  expect_success
  moe run --prompt-ids 5,17,42 --max-new-tokens 4
  expect_refused
  moe run --model "$TINY" --max-new-tokens 4
  expect_refused
  moe run --model "$TINY" --prompt-ids 5,abc --max-new-tokens 4
  expect_refused
}

# The cache is sized for the request: a generation past the reference engine's default cache
# (256 blocks of 16 tokens, which ended such a run with "latent cache: 1 more blocks needed")
# completes; one that needs more positions than the model has is refused before any work,
# naming the limit.
case_generation_length() {
  moe run --model "$TINY" --prompt-ids 5,17 --max-new-tokens 4200
  expect_success || return
  is_id_line "$(cat "$TMP/out")" 4200 512 || fail "expected 4200 ids in [0, 512) on one line"
  moe run --model "$TINY" --prompt-ids 5,17 --max-new-tokens 163840
  expect_clear_error run "needs 163841 positions" "163840 (max_position_embeddings)"
  moe run --model "$TINY" --prompt-ids 5,17 --max-new-tokens 9223372036854775807
  expect_clear_error run "max_position_embeddings"
}

# An empty prompt has nothing to condition on; it must be refused, not replaced by some
# default token (an empty string must not parse as token 0).
case_empty_prompt_ids() {
  moe run --model "$TINY" --prompt-ids "" --max-new-tokens 4
  expect_refused
}

# --engine gpu: the GPU engine behind the same output contract. Where there is no GPU (or no
# CUDA backend) it must say so clearly; on a GPU, in f32 it gives transformers' greedy tokens
# (the engine's tests hold it to that), its dumped logits are the golden ones within 1e-3, and
# FP8 weights with expanded products (small-v3-fp8 kept FP8) give the bf16 engine's tokens on
# the dequantised checkpoint. Misused flags are clear errors on every build.
case_gpu_engine_greedy() {
  local prompt want
  prompt=$(st ints "$GOLDEN" greedy_prompt 0 ,) || { fail "cannot read greedy_prompt"; return; }
  want=$(st ints "$GOLDEN" greedy_tokens 0 " ") || { fail "cannot read greedy_tokens"; return; }
  moe run --model "$TINY" --prompt-ids "$prompt" --max-new-tokens 4 --fp8 expand
  expect_clear_error run "--fp8 and --gpu-dtype need --engine gpu"
  moe run --model "$TINY" --prompt-ids "$prompt" --max-new-tokens 16 --engine gpu --gpu-dtype f32
  if ((RC != 0)); then
    expect_clear_error run "no GPU" || return
    echo "gpu_engine_greedy: no GPU here ($(head -c 200 "$TMP/err")); only the refusals were checked"
    return
  fi
  expect_success || return
  if [[ $(cat "$TMP/out") != "$want" ]]; then
    fail "f32 GPU greedy tokens differ from transformers'"
    show_last
  fi
  # Sampled: the reference engine's tokens for the same flags (f32 logits within ~1e-5 of the
  # reference's; the device draws what cpu::sample draws), with and without the dumped logits
  # (the first token then drawn on the host).
  local sampled=(--temperature 0.8 --top-k 20 --top-p 0.95 --seed 7 --max-new-tokens 16)
  moe run --model "$TINY" --prompt-ids "$prompt" "${sampled[@]}"
  expect_success || return
  want=$(cat "$TMP/out")
  moe run --model "$TINY" --prompt-ids "$prompt" "${sampled[@]}" --engine gpu --gpu-dtype f32
  expect_success || return
  if [[ $(cat "$TMP/out") != "$want" ]]; then
    fail "f32 GPU sampled tokens differ from the reference engine's"
    show_last
  fi
  moe run --model "$TINY" --prompt-ids "$prompt" "${sampled[@]}" --engine gpu --gpu-dtype f32 \
    --dump-logits "$TMP/sampled_logits.safetensors"
  expect_success || return
  if [[ $(cat "$TMP/out") != "$want" ]]; then
    fail "f32 GPU sampled tokens with --dump-logits differ from the reference engine's"
    show_last
  fi
  moe run --model "$TINY" --prompt-ids "$(st ints "$GOLDEN" input_ids 0 ,)" --max-new-tokens 0 \
    --engine gpu --gpu-dtype f32 --dump-logits "$TMP/logits.safetensors"
  expect_success || return
  local why
  why=$(st compare-logits "$TMP/logits.safetensors" "$GOLDEN" 0 1e-3 2>&1) || fail "$why"
  local fp8_dir=$DATA/small-v3-fp8 fp8_prompt plain
  fp8_prompt=$(st ints "$fp8_dir/golden.safetensors" greedy_prompt 0 ,) || { fail "cannot read small-v3-fp8"; return; }
  moe run --model "$fp8_dir" --prompt-ids "$fp8_prompt" --max-new-tokens 16 --engine gpu
  expect_success || return
  plain=$(cat "$TMP/out")
  moe run --model "$fp8_dir" --prompt-ids "$fp8_prompt" --max-new-tokens 16 --engine gpu --fp8 expand
  expect_success || return
  if [[ $(cat "$TMP/out") != "$plain" ]]; then
    fail "FP8 weights with expanded products differ from the dequantised checkpoint's tokens"
    show_last
  fi
}

# ---------------------------------------------------------------------------------------------

if [[ ! -x $MOE ]]; then
  echo "moe binary '$MOE' is not executable" >&2
  exit 2
fi
if ! declare -F "case_$CASE" >/dev/null; then
  echo "unknown case '$CASE'; cases:" >&2
  declare -F | sed -n 's/^declare -f case_/  /p' >&2
  exit 2
fi
"case_$CASE"
if ((FAILURES)); then
  echo "$CASE: $FAILURES check(s) failed" >&2
  exit 1
fi
echo "$CASE: ok"
