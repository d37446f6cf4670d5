"""``mogu calibrate`` and ``mogu probe``: the usability/safety dial and layer selection.

    mogu calibrate --model M [--gguf-file F] --mogu MOGU_DIR --prompts VAL.jsonl --out DIR [--target 0.05]
    mogu probe     --model M [--gguf-file F] --train F --heldout F --out DIR [--top K] [--benign-rate 0.05]

See ``mogu.evaluation.calibration`` and ``mogu.evaluation.probing``; model options and path checks as in
``mogu.cli.common``.
"""
from __future__ import annotations

import argparse
import os

from ..evaluation.calibration import DEFAULT_OFFSETS
from .common import (EXPLAIN_M, add_eval_model_args, check_model, check_mogu_folder, check_out, check_positive,
                     load_inference_model)


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "calibrate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="choose the router offset (usability/safety dial) on validation prompts",
        description="Sweeps the router offset d (unwill logit - d, glad logit + d), generates with MoGU on labelled "
                    "validation prompts, and stores in the --mogu folder the smallest d whose benign refusal rate "
                    "stays <= --target there and at every larger d. Writes calibration.json and calibration.png "
                    "(refusal on malicious vs benign as d moves) in --out.",
        epilog="Example: mogu calibrate --model M --mogu runs/x/router/folded "
               f"--prompts mogu/samples/safety/validation.jsonl --out runs/x/calibration\n{EXPLAIN_M}")
    add_eval_model_args(c, with_mogu=False)
    c.add_argument("--mogu", required=True, help="MoGU folder (own format); its mogu_config.json receives the dial "
                                                 "(required)")
    c.add_argument("--prompts", nargs="+", required=True,
                   help="labelled validation prompt files (benign/borderline and malicious rows) (required)")
    c.add_argument("--target", type=float, default=0.05,
                   help="highest accepted benign refusal rate, 0..1 (default: %(default)s)")
    c.add_argument("--offsets", type=float, nargs="+", default=list(DEFAULT_OFFSETS),
                   help="grid of offsets d, ascending (default: %(default)s)")
    c.add_argument("--refine", type=int, default=2,
                   help="bisection steps between the chosen grid point and the one below it, one pass over the "
                        "prompts each (default: %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=16, help="tokens per response (default: %(default)s)")
    c.add_argument("--dry-run", action="store_true", help="report the choice without writing it to --mogu "
                                                          "(default: write it)")
    c.add_argument("--out", required=True, help="output folder for the sweep (required)")
    c.set_defaults(func=run_calibrate)

    p = subparsers.add_parser(
        "probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="rank layers by how well their activations separate benign from malicious prompts (MoGU v2)",
        description="Fits a logistic-regression probe per target layer on --train prompts and ranks the layers by "
                    "its accuracy on --heldout prompts; also prints, per layer, the held-out malicious prompts it "
                    "catches when at most --benign-rate of the benign ones (borderline included) are flagged, a "
                    "yardstick for what calibrated routers can reach. Writes probe.json and probe.png in --out. Use "
                    "the best K with MoGUConfig(layers=[...]) or layers='auto:K'.",
        epilog="Example: mogu probe --model M --train mogu/samples/safety/train.jsonl "
               f"--heldout mogu/samples/safety/validation.jsonl --out runs/probe --top 8\n{EXPLAIN_M}")
    add_eval_model_args(p, with_mogu=False)
    p.add_argument("--train", nargs="+", required=True, help="labelled prompt files to fit the probes (required)")
    p.add_argument("--heldout", nargs="+", required=True, help="labelled prompt files to score them (required)")
    p.add_argument("--top", type=int, default=None, help="mark and print the best K layers (default: none)")
    p.add_argument("--benign-rate", type=float, default=0.05,
                   help="benign refusal rate at which the recall column is read (default: %(default)s)")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module-name suffixes whose inputs are probed (default: the family's MoGU target, e.g. "
                        "self_attn.o_proj)")
    p.add_argument("--out", required=True, help="output folder (required)")
    p.set_defaults(func=run_probe)


def _rows(paths):
    from ..evaluation.prompt_files import read_prompt_file
    return [r for path in paths for r in read_prompt_file(path)]


def run_calibrate(args) -> int:
    from ..evaluation.calibration import calibrate
    from ..checkpoint import OWN_CONFIG

    check_positive(args, "max_new_tokens", "batch_size")
    if not 0.0 <= args.target <= 1.0:
        raise ValueError(f"--target must be in [0, 1], got {args.target}")
    if sorted(set(args.offsets)) != list(args.offsets):
        raise ValueError(f"--offsets must be ascending and distinct, got {' '.join(map(str, args.offsets))}")
    for path in args.prompts:                           # every path given is checked before the model loads
        _rows([path])
    args.mogu = check_mogu_folder(args.mogu, own_only=True)
    args.out = check_out(args.out)
    check_model(args, "calibrate")
    model, tokenizer = load_inference_model(args, mogu_path=args.mogu)
    result = calibrate(model, tokenizer, args.prompts, out=args.out, target_benign_refusal=args.target,
                       offsets=args.offsets, refine=args.refine, mogu_dir=None if args.dry_run else args.mogu,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system,
                       progress=not args.no_progress)
    verdict = "meets" if result.met_target else "does NOT meet"
    print(f"calibrate: chosen offset d={result.chosen:g} ({verdict} benign refusal <= {args.target:g}); "
          f"{'not written (--dry-run)' if args.dry_run else 'written to ' + os.path.join(args.mogu, OWN_CONFIG)}; "
          f"curve in {os.path.abspath(args.out)}")
    return 0


def run_probe(args) -> int:
    from ..config import MoGUConfig
    from ..evaluation.probing import check_benign_rate, probe_layers

    check_positive(args, "batch_size", "top")
    check_benign_rate(args.benign_rate, "--benign-rate")              # before the model loads
    train, heldout = _rows(args.train), _rows(args.heldout)      # checked before the model loads
    args.out = check_out(args.out)
    check_model(args, "probe")
    model, tokenizer = load_inference_model(args)
    config = MoGUConfig(target_modules=args.target_modules) if args.target_modules else None
    result = probe_layers(model, tokenizer, train, heldout, out=args.out, config=config, top=args.top,
                          system=args.system, batch_size=args.batch_size, benign_rate=args.benign_rate,
                          progress=not args.no_progress)
    rate = f"{100 * result.benign_rate:g}%"
    categories = list(result.recall_by_category)
    print(f"rank  layer  held-out accuracy  malicious caught at {rate} benign"
          + "".join(f"  {c}" for c in categories) + "  module")
    for rank, layer in enumerate(result.ranking[:args.top or len(result.ranking)]):
        print(f"{rank + 1:4d}  {layer:5d}  {100 * result.accuracy[layer]:16.1f}%  {100 * result.recall[layer]:31.1f}%"
              + "".join(f"  {100 * result.recall_by_category[c][layer]:{len(c) - 1}.1f}%" for c in categories)
              + f"  {result.modules[layer]}")
    best = max(range(len(result.recall)), key=lambda l: result.recall[l])
    print(f"probe: highest recall at {rate} benign: layer {best}, {100 * result.recall[best]:.1f}% of held-out "
          f"malicious prompts" + "".join(f", {c} {100 * result.recall_by_category[c][best]:.1f}%" for c in categories))
    if args.top:
        print(f"probe: best {args.top}: layers={result.best(args.top)}")
    return 0
