"""A saved hybrid checkpoint runs under lm-evaluation-harness as a plain HF path on our task file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval); "
                                      "docs/lm-eval.md runs it from its own environment")

from hybridize.convert.checkpoint import save_hybrid  # noqa: E402
from hybridize.convert.surgery import build_hybrid  # noqa: E402
from hybridize.data.synthetic import synthesize, write_jsonl  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "lm_eval_tasks"


@pytest.mark.slow
def test_hybrid_checkpoint_runs_under_lm_eval_on_the_synthetic_task(tmp_path):
    from hybridize.convert.teacher import load_teacher

    tokenizer = load_teacher("smollm2-135m")[1]
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    checkpoint = save_hybrid(build_hybrid(teacher, ["attention", "mamba"]), tokenizer, tmp_path / "tiny-hybrid")
    data = tmp_path / "test.jsonl"
    write_jsonl(synthesize("arithmetic", 3, seed=0, split="test"), data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
               "--tasks", "hybridize_synth", "--include_path", str(TASKS), "--apply_chat_template",
               "--metadata", json.dumps({"data_file": str(data)}), "--gen_kwargs", "max_gen_toks=8",
               "--device", "cpu", "--batch_size", "3", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1
    task = results[0]["results"]["hybridize_synth"]
    assert 0.0 <= task["exact_match,strict-match"] <= 1.0
    assert results[0]["n-samples"]["hybridize_synth"]["effective"] == 3
