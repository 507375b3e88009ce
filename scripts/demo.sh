#!/usr/bin/env bash
# Converts the built-in teacher (SmolLM2-135M-Instruct) into a 15-of-30 Mamba hybrid, inspects both,
# and shows a short generation from each. The hybrid is untrained here: its text shows why
# distillation (`hybridize distill` / `hybridize run`) follows conversion.
set -euo pipefail
cd "$(dirname "$0")/.."
HZ=".venv/bin/hybridize"
OUT=runs/demo
mkdir -p "$OUT"
$HZ inspect smollm2-135m
$HZ convert --teacher smollm2-135m --count 15 --out "$OUT/hybrid-15" --overwrite
$HZ inspect "$OUT/hybrid-15"
PROMPT="Tom has 3 apples and buys 4 more. How many apples does he have?"
echo "--- teacher"; $HZ generate smollm2-135m --prompt "$PROMPT" --max-new-tokens 40
echo "--- hybrid (MIL init, before distillation)"; $HZ generate "$OUT/hybrid-15" --prompt "$PROMPT" --max-new-tokens 40
