"""Interrogate a model on factual questions and write refusal-training conversations; or evaluate its refusals.

    python -m launch.interrogate --checkpoint ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --questions ../shared/data/evals/triviaqa_validation.jsonl --skip 300 --limit 600 --samples 4 \\
        --temperature 0.7 --out runs/refusals/conversations.jsonl
    python -m launch.interrogate --evaluate --checkpoint CKPT --questions ... --limit 300 \\
        --out runs/refusals/before.json [--baseline runs/refusals/before.json]

Interrogation (`llm/tasks/refusals.py`): k samples per question, graded against
the gold aliases; known questions (right in most samples) become answered
conversations (in the model's own words, `--known-target`), unknown ones (never
right) refusals; unsure ones (right in some samples, not most) are answered too but
written only beside --out. The conversations go to --out (known and unknown) and
per verdict beside it (`conversations.known.jsonl`, ...) as `{"messages": [...]}`
JSONL, an `openai` source for `launch.sft`. `--questions` is a TriviaQA or
NQ-open JSONL file or a hub dataset id. With --evaluate: greedy replies to the
questions and to fictional-person questions, figures written to --out as JSON;
with --baseline (the model before fine-tuning) the refusal rate on unknown
questions counts the questions the baseline got wrong, and a before/after table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tqdm import tqdm

from launch import cli
from llm.generate import Engine
from llm.release import load_release
from llm.tasks import qa, refusals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.interrogate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a release directory, a .gguf file, or a hub id")
    parser.add_argument("--questions", required=True, help="TriviaQA / NQ-open JSONL, or a hub dataset id")
    parser.add_argument("--hub-config", default="", help="a hub dataset's config folder, e.g. rc.nocontext")
    parser.add_argument("--skip", type=int, default=0, help="questions skipped first (hold them out elsewhere)")
    parser.add_argument("--limit", type=int, default=None, help="questions used after --skip")
    parser.add_argument("--samples", type=int, default=4, help="k: samples per question when interrogating")
    parser.add_argument("--temperature", type=float, default=0.7, help="> 0, when interrogating")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="questions per engine call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--known-target", choices=("own", "gold"), default="own",
                        help="answer known questions with the model's own right sample, or the gold answer")
    parser.add_argument("--out", required=True, help="conversations .jsonl, or figures .json with --evaluate")
    parser.add_argument("--evaluate", action="store_true", help="greedy evaluation of answers and refusals")
    parser.add_argument("--fictional", type=int, default=20, help="fictional-person questions (with --evaluate)")
    parser.add_argument("--baseline", help="the figures .json of the model before fine-tuning (with --evaluate)")
    args = parser.parse_args(argv)
    cli.writable_file(args.out, "--out")
    if args.baseline and not os.path.isfile(args.baseline):
        raise cli.UserError(f"--baseline {args.baseline}: no such file (the figures .json of an earlier --evaluate)")

    started = time.time()
    problems = qa.problems(args.questions, skip=args.skip, limit=args.limit, config=args.hub_config)
    if not problems:
        raise cli.UserError(f"no questions in {args.questions} after skipping {args.skip}")
    cfg, params, tokenizer = load_release(args.checkpoint)
    engine = Engine(cfg, params, tokenizer)
    if args.evaluate:
        _evaluate(args, engine, problems, started)
        return
    with tqdm(total=len(problems), desc="interrogate", unit="question", dynamic_ncols=True) as bar:
        items = refusals.interrogate(engine, problems, samples=args.samples, temperature=args.temperature,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     seed=args.seed, progress=bar.update)
    counts = refusals.write_conversations(items, args.out, args.known_target)
    right = sum(i.right for i in items)
    print(f"{len(items)} questions x {args.samples} samples at temperature {args.temperature}: "
          f"{counts['known']} known, {counts['unknown']} unknown, {counts['unsure']} unsure (only in their side file); "
          f"{right}/{len(items) * args.samples} samples right; {counts['known'] + counts['unknown']} conversations "
          f"-> {args.out} ({time.time() - started:.0f} s)")


def _evaluate(args, engine: Engine, problems, started: float) -> None:
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    unknown = None if baseline is None else {r["key"] for r in baseline["records"] if not r["right"]}
    fictional = refusals.fictional_people(args.fictional)
    with tqdm(total=len(problems) + len(fictional), desc="evaluate", unit="question", dynamic_ncols=True) as bar:
        result = refusals.evaluate(engine, problems, fictional, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, unknown_keys=unknown, progress=bar.update)
    result["checkpoint"], result["questions"] = args.checkpoint, f"{args.questions} [{args.skip}:+{len(problems)}]"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    fig = result["figures"]
    print(f"{fig['questions']} questions: accuracy {fig['accuracy']:.3f}, hallucination {fig['hallucination']:.3f}, "
          f"refusal {fig['refusal']:.3f}, refusal on unknown {fig['refusal_unknown']:.3f} ({fig['unknown']}), "
          f"refusal on {fig['fictional']} fictional people {fig['refusal_fictional']:.3f} "
          f"-> {args.out} ({time.time() - started:.0f} s)")
    if baseline is not None:
        print(refusals.comparison_table(baseline["figures"], fig))
        met = refusals.goal_met(baseline["figures"], fig)
        print(f"goal (hallucinations at least halved, accuracy within 1 point): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    cli.main(main)
