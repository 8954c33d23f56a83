"""Multiple-choice evaluation of a real GGUF model: ours against lm-evaluation-harness's `hf` backend, side by side.

    python -m bench.evals [--model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --hellaswag 200 --arc-easy 0]

Both sides read the same file and the same items: ours dequantizes the GGUF to
float32 (`llm.gguf.load_gguf`) and scores with `llm.evals.multiple_choice`;
lm-evaluation-harness (`pip install lm-eval`) runs its `hf` backend on the model
`transformers` loads from the same file (`gguf_file=`, float32), through
`simple_evaluate` on local copies of the tasks (its own HellaSwag and ARC prompts
and `process_docs`, `dataset_path: json` over the first N records of
`../shared/data/evals`, no download). Items/s is items over the wall time of the
scoring call, model load excluded on both sides, our compilation included (one
shape per task). The accuracies (acc, acc_norm) of both sides are printed: the
same rule on the same items, so they should agree but for near-ties.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "evals"

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
{body}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
# The harness's own prompts (lm_eval/tasks/hellaswag/hellaswag.yaml, lm_eval/tasks/arc/arc_easy.yaml).
_BODIES = {
    "hellaswag": 'process_docs: !function utils.process_docs\ndoc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\n'
                 'doc_to_choice: "choices"',
    "arc_easy": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{choices.label.index(answerKey)}}"\n'
                'doc_to_choice: "{{choices.text}}"',
}
_FILES = {"hellaswag": "hellaswag_val.jsonl", "arc_easy": "arc_easy_validation.jsonl"}


def _first_records(name: str, n: int, directory: str) -> str:
    path = os.path.join(directory, f"{name}.jsonl")
    with open(DATA / _FILES[name]) as src, open(path, "w") as dst:
        for _, line in zip(range(n), src):
            dst.write(line)
    return path


def ours(model: str, counts: dict[str, int], batch_rows: int) -> dict[str, dict]:
    import jax

    from llm import gguf
    from llm.evals import multiple_choice as mc
    from llm.tasks import choice_sets

    cfg, params, tokenizer = gguf.load_gguf(model)
    jax.block_until_ready(params)
    out = {}
    for name, n in counts.items():
        t = time.perf_counter()
        if name == "hellaswag":
            items = choice_sets.hellaswag(str(DATA / _FILES[name]), limit=n)
        else:
            items = choice_sets.arc(str(DATA / _FILES[name]), limit=n)
        scores = mc.score(cfg, params, tokenizer, items, batch_rows=batch_rows)
        seconds = time.perf_counter() - t
        out[name] = {**mc.summarize(scores), "seconds": seconds, "items_per_s": len(items) / seconds}
        print(f"ours {name}: {out[name]}", flush=True)
    return out


def harness(model: str, counts: dict[str, int], batch_size: int, threads: int) -> dict[str, dict]:
    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(threads)
    folder, name = os.path.split(model)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=batch_size)
    out = {}
    with tempfile.TemporaryDirectory() as tasks_dir:
        shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py", tasks_dir)
        for task, n in counts.items():
            data = _first_records(task, n, tasks_dir)
            with open(os.path.join(tasks_dir, f"{task}_bench.yaml"), "w") as f:
                f.write(_YAML.format(task=f"{task}_bench", data=data, body=_BODIES[task]))
        manager = TaskManager(include_path=tasks_dir)
        for task, n in counts.items():
            t = time.perf_counter()
            results = lm_eval.simple_evaluate(model=lm, tasks=[f"{task}_bench"], task_manager=manager,
                                              num_fewshot=0, bootstrap_iters=0)
            seconds = time.perf_counter() - t
            figures = results["results"][f"{task}_bench"]
            out[task] = {"acc": figures["acc,none"], "acc_norm": figures["acc_norm,none"], "items": n,
                         "seconds": seconds, "items_per_s": n / seconds}
            print(f"lm-eval {task}: {out[task]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT))
    parser.add_argument("--hellaswag", type=int, default=200, help="first N HellaSwag validation items (0: skip)")
    parser.add_argument("--arc-easy", type=int, default=0, help="first N ARC-Easy validation items (0: skip)")
    parser.add_argument("--sides", nargs="+", default=["ours", "lm-eval"])
    parser.add_argument("--batch-rows", type=int, default=16, help="ours: packed rows per forward")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval: requests per forward")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not os.path.exists(args.model) or not DATA.exists():
        raise SystemExit(f"needs {args.model} and {DATA} (../shared absent?)")
    counts = {k: n for k, n in (("hellaswag", args.hellaswag), ("arc_easy", args.arc_easy)) if n}
    figures = {}
    if "ours" in args.sides:
        figures["ours"] = ours(args.model, counts, args.batch_rows)
    if "lm-eval" in args.sides:
        figures["lm-eval"] = harness(args.model, counts, args.batch_size, args.threads)
    print(f"\n{os.cpu_count()} cpus; items/s (acc, acc_norm)")
    for task in counts:
        row = {side: figures[side][task] for side in figures}
        print(f"{task} ({counts[task]} items): " + "; ".join(
            f"{side} {f['items_per_s']:.2f} items/s ({f['acc']:.4f}, {f['acc_norm']:.4f})" for side, f in row.items()))
        if len(row) == 2:
            print(f"  ours / lm-eval: {row['ours']['items_per_s'] / row['lm-eval']['items_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, **figures}, f, indent=2)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
