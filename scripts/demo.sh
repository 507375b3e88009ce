#!/usr/bin/env bash
# The main job on the built-in defaults: inspect the teacher (SmolLM2-135M-Instruct), then run the
# staged demo recipe (LOO -> 15 of 30 Mamba layers -> distil -> MMR -> 18 -> distil -> SFT -> eval ->
# report) into runs/demo. Started again, it resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
HZ=".venv/bin/hybridize"
$HZ inspect smollm2-135m
$HZ run recipes/smollm2-demo.yaml --out runs/demo
$HZ inspect runs/demo/h18-sft
