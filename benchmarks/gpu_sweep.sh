#!/usr/bin/env bash
# The whole GPU sweep in one command, for a machine with an accelerator (one prepared script;
# the device is recorded in every results.json by benchmarks/common.describe_machine).
#
#   OUT=/some/dir bash benchmarks/gpu_sweep.sh      # results under $OUT/<benchmark>/
#   OUT=$OUT PACK=1 bash benchmarks/gpu_sweep.sh     # on the device tool: one $OUT/gpu_sweep.tgz
#
# Order: the GPU target first (Transformer vs LSTM, T up to 2048, all budgets), then the
# attention kernel with bf16 (ours vs "xla" vs "cudnn"), then training throughput, then
# gpt2-small with each --remat, scanned and not, then the translation comparison. Each step has
# its own time limit so that a slow step still leaves the others' results; the budget is about
# 13 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python - <<'PY' || exit 2
import jax
d = jax.devices()[0]
if d.platform == "cpu":
    raise SystemExit("gpu_sweep.sh: no accelerator found (jax sees only the CPU); "
                     "the CPU figures come from the scripts' --quick runs instead")
print("device:", d.device_kind, "| jax", jax.__version__)
PY
step() {  # step SECONDS NAME CMD...
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]}"
}
step 210 transformer_vs_rnn python benchmarks/transformer_vs_rnn.py --out "$OUT/transformer_vs_rnn"
step 120 attention python benchmarks/attention.py --bf16 --out "$OUT/attention"
# Ring attention over the machine's accelerators (P = 1, 2, 4, ... up to their count), beside
# the exact and blockwise paths on one; bounded like the rest.
step 60 attention_ring python benchmarks/attention.py --ring --quick --out "$OUT/attention_ring"
step 90 train_throughput python benchmarks/train_throughput.py --quick --out "$OUT/train_throughput"
# gpt2-small bf16: memory, tokens/s and MFU for each --remat, scanned and not; compile time vs
# depth, scanned and not.
step 170 memory python benchmarks/memory.py --dtype bfloat16 --run 5 --out "$OUT/memory"
# The paper's Table 2 claim at a small scale: Transformer vs attentional LSTM translator, the
# same training seconds each, on the gettext catalogs (or TRANSLATION_PAIRS=FILE, e.g. the
# catalogs.de.jsonl a CPU run left in its --work folder, where the machine has no catalogs).
step 180 translation_vs_rnn python benchmarks/translation.py --quick --models transformer,lstm \
  --budget 40 ${TRANSLATION_PAIRS:+--pairs "$TRANSLATION_PAIRS"} --out "$OUT/translation_vs_rnn"
# PACK=1 (for the device tool, which returns at most 8 files): one tarball instead of the folders.
if [ "${PACK:-0}" = 1 ]; then
  tar -czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && rm -rf "$OUT" && mkdir -p "$OUT" && mv "$OUT.tgz" "$OUT/gpu_sweep.tgz"
  ls -l "$OUT"
fi
