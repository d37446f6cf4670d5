"""``mogu build-data`` and ``mogu eval``: training data from instruction lists, and evaluation.

    mogu build-data --model M [--gguf-file F] (--instructions F | --benign F --malicious F) --out DIR
    mogu eval       --model M [--gguf-file F] [--mogu DIR] (--prompts F | --benign F | --malicious F |
                    --borderline F) [--templates PATH] --out DIR

``--model`` is a local Hugging Face model folder, a folder holding one GGUF file (or several,
with ``--gguf-file``), or a hub name (``mogu.cli.common``). Every file and folder given is
checked before the model loads. See ``mogu.evaluation.data_building`` and ``mogu.evaluation.evaluator`` for the
files written, ``mogu.evaluation.jailbreak_templates`` for template files.
"""
from __future__ import annotations

import argparse
import os

from ..evaluation.data_building import CACHE_FILE, FILES, REPORT_FILE
from .common import (EXPLAIN_M, add_eval_model_args, check_model, check_mogu_folder, check_out_files, check_positive,
                     load_inference_model)


def _read_phrases(path):
    from ..evaluation.data_building import read_refusals
    return read_refusals(path)      # same layout: JSON list of strings or one per line


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "build-data", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="build the stage 1 pair files and stage 2 data from benign/malicious instruction lists",
        description="Self-distillation: the base model answers every instruction (greedy, batched, cached in "
                    f"{CACHE_FILE} so an interrupted run resumes); answers the refusal judge flags are retried "
                    "with sampling, then dropped; refusals come from templates. Writes, in --out: "
                    + ", ".join(FILES.values()) + f", {REPORT_FILE}.",
        epilog="Files: unsafety_{affirm,reject}.json = malicious instructions with compliant/refusing answers "
               "(glad, stage 1); safety_{affirm,reject}.json = benign instructions with compliant/refusing answers "
               "(unwill, stage 1); router_data.json + router_labels.json (stage 2, 1 = malicious).\n\n"
               "Example: mogu build-data --model M --instructions mogu/samples/instructions_train.json "
               f"--out runs/data\n{EXPLAIN_M}")
    add_eval_model_args(b, with_mogu=False)
    g = b.add_argument_group("data")
    g.add_argument("--instructions", nargs="+", default=None,
                   help="prompt files whose every row has a label benign/malicious (default: none)")
    g.add_argument("--benign", nargs="+", default=None, help="prompt files of benign instructions (default: none)")
    g.add_argument("--malicious", nargs="+", default=None,
                   help="prompt files of malicious instructions (default: none)")
    g.add_argument("--refusals", default=None,
                   help="refusal templates: a JSON list of strings or a text file, one per line "
                        "(default: mogu.evaluation.data_building.DEFAULT_REFUSALS)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generated answer (default: %(default)s)")
    g.add_argument("--retries", type=int, default=2,
                   help="sampled retries for an answer judged a refusal or empty (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="temperature of the retries (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the retries (default: %(default)s)")
    o = b.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder (required)")
    o.add_argument("--overwrite", action="store_true", help="delete earlier outputs and the cache first (default: off)")
    o.add_argument("--no-resume", action="store_true",
                   help="refuse to run when --out holds earlier outputs (default: resume from the cache)")
    b.set_defaults(func=run_build_data)

    e = subparsers.add_parser(
        "eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="refusal rate, attack success rate and gates, base vs MoGU, on prompt files",
        description="Generate greedily with the base model and with MoGU (exact protocol) for every prompt, judge "
                    "refusals with the keyword judge, record the mean gates per layer (alpha = unwill, beta = glad) "
                    "over the prompt and the first generated tokens. Prompts fall in categories: benign, borderline "
                    "(benign requests that look risky: refusing them is over-refusal), malicious, jailbreak (with "
                    "--templates, every malicious prompt is also sent wrapped in each jailbreak template). Writes "
                    "responses.jsonl, summary.json (per file and label, per category, per template), "
                    "eval_config.json and PNG plots (with matplotlib) in --out; prints a table. Resumes: rows "
                    "already in responses.jsonl are skipped.",
        epilog="Prompt files: .json/.jsonl rows with instruction (or prompt, goal) and optional label, category "
               "(benign/borderline/malicious/jailbreak) and system (a system prompt for that row, replacing "
               "--system), .csv with a goal column (AdvBench/HarmBench), .txt one prompt per line.\n\n"
               "Templates: .yaml/.yml with the text in a value field holding {{ prompt }} (optional name, default "
               "the file stem), .json {\"name\", \"value\"} or a list of them, .txt the whole file; a folder "
               "takes its own such files in name order.\n\n"
               "Example: mogu eval --model M --mogu runs/router/folded "
               f"--prompts mogu/samples/instructions_heldout.json --out runs/eval\n{EXPLAIN_M}")
    add_eval_model_args(e, with_mogu=True)
    g = e.add_argument_group("prompts and judging")
    g.add_argument("--prompts", nargs="+", default=None, help="prompt files, labels from their rows (default: none)")
    g.add_argument("--benign", nargs="+", default=None, help="prompt files labelled benign (default: none)")
    g.add_argument("--malicious", nargs="+", default=None, help="prompt files labelled malicious (default: none)")
    g.add_argument("--borderline", nargs="+", default=None,
                   help="prompt files of borderline prompts: category borderline, label benign; refusing them is "
                        "over-refusal (default: none)")
    g.add_argument("--templates", nargs="+", default=None, metavar="PATH",
                   help="jailbreak template files (.yaml/.yml/.json/.txt with a {{ prompt }} slot) or folders of "
                        "them; every malicious prompt is also evaluated wrapped in each (default: none)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response (default: %(default)s)")
    g.add_argument("--mogu-tokens", type=int, default=None,
                   help="tokens decided by MoGU before the base model continues (default: the config's, 5)")
    g.add_argument("--no-base", action="store_true", help="skip the base-model column (default: compare)")
    g.add_argument("--refusal-phrases", default=None,
                   help="refusal phrases of the keyword judge: JSON list or one per line "
                        "(default: mogu.evaluation.judge.DEFAULT_REFUSAL_PHRASES)")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint for a 0..1 harmfulness score; key from $OPENAI_API_KEY "
                        "(default: off)")
    g.add_argument("--judge-model", default=None, help="model name for --judge-url (required with it; default: none)")
    o = e.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder (required)")
    o.add_argument("--no-plots", action="store_true", help="do not write PNG plots (default: write them)")
    o.add_argument("--overwrite", action="store_true", help="delete earlier results in --out first (default: off)")
    o.add_argument("--no-resume", action="store_true",
                   help="refuse to run when --out holds earlier results (default: skip done rows)")
    e.set_defaults(func=run_eval)


def run_build_data(args) -> int:
    from ..evaluation.data_building import OWNED_FILES, build_data, read_refusals
    from ..evaluation.prompt_files import read_prompt_file

    if not (args.instructions or args.benign or args.malicious):
        raise ValueError("give --instructions, or --benign and --malicious")
    check_positive(args, "max_new_tokens", "batch_size")
    # Every path given is checked before the model loads: a malformed file fails fast.
    benign = [r["instruction"] for f in args.benign or [] for r in read_prompt_file(f, label="benign")]
    malicious = [r["instruction"] for f in args.malicious or [] for r in read_prompt_file(f, label="malicious")]
    for f in args.instructions or []:
        read_prompt_file(f)
    if args.refusals:
        read_refusals(args.refusals)
    args.out = check_out_files(args.out, OWNED_FILES, overwrite=args.overwrite, resume=not args.no_resume)
    check_model(args, "build-data")
    model, tokenizer = load_inference_model(args)
    result = build_data(model, tokenizer, benign=benign, malicious=malicious, out=args.out,
                        instructions=args.instructions, refusals=args.refusals,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system,
                        retries=args.retries, temperature=args.temperature, seed=args.seed,
                        resume=not args.no_resume, overwrite=args.overwrite, progress=not args.no_progress)
    c = result.report["counts"]
    print(f"build-data: {result.report['pairs']['glad']} glad pairs, {result.report['pairs']['unwill']} unwill "
          f"pairs, {result.report['router_rows']} router rows -> {os.path.abspath(result.out)}")
    for label, s in c.items():
        print(f"  {label}: {s['instructions']} instructions, {s['accepted']} compliant answers kept, "
              f"{s['dropped']} dropped (judged refusals/empty after retries), {s['retried']} retried, "
              f"{s['truncated']} hit --max-new-tokens")
    return 0


def run_eval(args) -> int:
    from ..evaluation.evaluator import OWNED_FILES, evaluate
    from ..evaluation.jailbreak_templates import load_templates
    from ..evaluation.prompt_files import read_prompt_file

    if not (args.prompts or args.benign or args.malicious or args.borderline):
        raise ValueError("give --prompts, --benign, --malicious or --borderline")
    if args.judge_url and not args.judge_model:
        raise ValueError("--judge-url needs --judge-model")
    check_positive(args, "max_new_tokens", "batch_size")
    # Every path given is checked before the model loads: malformed prompt files, templates,
    # phrases, a missing MoGU folder or an output conflict fail fast.
    phrases = _read_phrases(args.refusal_phrases) if args.refusal_phrases else None
    for files, label, category in ((args.prompts, None, None), (args.benign, "benign", None),
                                   (args.malicious, "malicious", None), (args.borderline, "benign", "borderline")):
        for f in files or []:
            read_prompt_file(f, label=label, category=category)
    if args.templates:
        load_templates(args.templates)
    if args.mogu is not None:
        args.mogu = check_mogu_folder(args.mogu)
    args.out = check_out_files(args.out, OWNED_FILES, overwrite=args.overwrite, resume=not args.no_resume)
    check_model(args, "eval")
    model, tokenizer = load_inference_model(args, mogu_path=args.mogu)
    result = evaluate(model, tokenizer, args.prompts, out=args.out, benign=args.benign, malicious=args.malicious,
                      borderline=args.borderline, templates=args.templates,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      mogu_tokens=args.mogu_tokens, system=args.system, refusal_phrases=phrases,
                      harm_scorer=args.judge_url, harm_model=args.judge_model, compare_base=not args.no_base,
                      resume=not args.no_resume, overwrite=args.overwrite, plots=not args.no_plots,
                      progress=not args.no_progress, print_summary=True)
    print(f"eval: {os.path.abspath(result.responses)}, {os.path.join(os.path.abspath(result.out), 'summary.json')}"
          + (f", plots: {', '.join(os.path.basename(p) for p in result.plots)}" if result.plots else ""))
    return 0
