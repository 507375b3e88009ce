"""Teacher-forced KL(teacher || hybrid) right after conversion, per initialisation of the new mixers.

Compares MIL init in the `apriel` and `aligned` layouts with fresh random mixers, on the built-in
teacher and built-in synthetic reasoning conversations (all tokens of each rendered conversation
count). Usage:

    python benchmarks/mil_init_kl.py --teacher smollm2-135m --count 15 --rows 48 --seeds 0 1 2
"""

import argparse
import json
import time

import torch

from hybridize.convert.surgery import build_hybrid, select_layers
from hybridize.convert.teacher import load_teacher
from hybridize.data.synthetic import synthesize
from hybridize.distill.losses import kl_per_token


def conversation_batches(tokenizer, rows, batch_size, max_length):
    tokenizer.padding_side = "right"
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)


@torch.no_grad()
def mean_kls(teacher, students: dict, batches):
    """KL(teacher || student) per token for each student; the teacher runs once per batch."""
    totals, count = {name: 0.0 for name in students}, 0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        t = teacher(**batch, use_cache=False).logits[mask]
        for name, student in students.items():
            totals[name] += kl_per_token(t, student(**batch, use_cache=False).logits[mask]).sum().item()
        count += mask.sum().item()
    return {name: total / count for name, total in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--count", type=int, default=15)
    parser.add_argument("--rows", type=int, default=48, help="conversations, split evenly over the tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    teacher, tokenizer = load_teacher(args.teacher)
    rows = []
    tasks = ["arithmetic", "variable_tracking", "multi_digit"]
    for task in tasks:
        rows += synthesize(task, args.rows // len(tasks), seed=1234, split="test")
    layers, how = select_layers(teacher.config.num_hidden_layers, count=args.count)
    kinds = ["mamba" if i in layers else "attention" for i in range(teacher.config.num_hidden_layers)]
    started = time.time()
    inits = {"mil_apriel": dict(mil_layout="apriel"), "mil_aligned": dict(mil_layout="aligned"),
             "random": dict(mixer_init="random")}
    students = {(name, seed): build_hybrid(teacher, kinds, seed=seed, **options)
                for name, options in inits.items() for seed in args.seeds}
    kls = mean_kls(teacher, students, conversation_batches(tokenizer, rows, 8, args.max_length))
    results = {name: [kls[(name, seed)] for seed in args.seeds] for name in inits}
    print(json.dumps({"teacher": args.teacher, "mixer_layers": layers, "selection": how, "rows": len(rows),
                      "seeds": args.seeds, "kl_teacher_hybrid": results, "seconds": round(time.time() - started)}))
    print(f"\n| init | KL(teacher || hybrid), nats/token, mean over seeds {args.seeds} | min | max |")
    print("| --- | --- | --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {sum(values) / len(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
