"""``mogu train-expert`` and ``mogu train-router``: the two MoGU training stages.

Data files, adapter folders, the router file, the output folder and the model path are
checked before the model loads (``mogu.cli.common``). Multi-GPU: ``accelerate launch -m
mogu.cli train-router ...`` (each process holds the whole model; data-parallel through
accelerate).
"""
from __future__ import annotations

import argparse
import os

from .common import (EXPLAIN_M, GGUF_HELP, MODEL_HELP, check_adapter_folder, check_files, check_model,
                         check_out, check_positive, check_tokenizer, load_training_model)
from ..training import COMMON_DEFAULTS, EXPERT_DEFAULTS, ROUTER_DEFAULTS

_FORMATS = ("Data files: a JSON list (.json) or one JSON value per line (.jsonl) of objects with string "
            "fields 'instruction' and 'output'. Prompts use the tokenizer's chat template, or the Llama-2 "
            "'[INST] <<SYS>>' template when it has none; the loss covers the answer tokens only.")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub name (default: the --model one)")
    g.add_argument("--gguf-file", default=None, help=GGUF_HELP)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modelling code from the model's repository (default: off)")


def _data_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-length", type=int, default=COMMON_DEFAULTS["max_length"],
                   help="token limit per sequence (prompt + answer), cut at the end (default: %(default)s)")
    g.add_argument("--system", default=None, help="system prompt for the template (default: none)")


def _run_args(p: argparse.ArgumentParser, per_step_flag: str, per_step_default: int, per_step_help: str,
              lr_default: float, epochs_default: int) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=lr_default,
                   help="AdamW learning rate, constant (default: %(default)s, published)")
    g.add_argument(per_step_flag, type=int, default=per_step_default,
                   help=f"{per_step_help} (default: %(default)s, published)")
    g.add_argument("--batch-size", type=int, default=COMMON_DEFAULTS["batch_size"],
                   help="examples per forward pass; must divide " + per_step_flag +
                        "; changes speed and memory, not the objective (default: %(default)s, published)")
    g.add_argument("--epochs", type=int, default=epochs_default,
                   help="passes over the data (default: %(default)s, published)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (default: none, run all epochs)")
    g.add_argument("--weight-decay", type=float, default=COMMON_DEFAULTS["weight_decay"],
                   help="AdamW weight decay (default: %(default)s, torch's AdamW default)")
    g.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradient norm to this value (default: none, no clipping)")
    g.add_argument("--seed", type=int, default=COMMON_DEFAULTS["seed"],
                   help="seed for initialisation, data order and dropout (default: %(default)s)")
    g.add_argument("--no-shuffle", action="store_true", help="keep the data order (default: shuffle every epoch)")
    g.add_argument("--bf16", action="store_true",
                   help="load and train the model in bfloat16, trainable parameters in fp32 (GPU; default: fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass to save memory (default: off)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder (required)")
    o.add_argument("--save-steps", type=int, default=COMMON_DEFAULTS["save_steps"],
                   help="write a checkpoint every N optimizer steps, and always at the end (default: %(default)s)")
    o.add_argument("--save-total-limit", type=int, default=None,
                   help="keep only the newest N checkpoints (default: keep all)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the training outputs in an existing, non-empty --out (default: refuse)")
    o.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, with its optimizer state and data "
                        "position; the other options must match the original run (default: off)")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "train-expert", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="stage 1: train one LoRA expert (glad or unwill) with the ratio loss",
        description="Stage 1: train one LoRA expert on the attention output projection with peft and the "
                    "published ratio loss, per pair: glad CE(affirm)/CE(reject), unwill CE(reject)/CE(affirm). "
                    "Writes a peft adapter folder (read by PeftModel.from_pretrained and mogu.load_official).",
        epilog=_FORMATS + " --affirm and --reject are aligned row by row (same instructions). Published data: "
               "glad on unsafety_{affirm,reject}.json, unwill on safety_{affirm,reject}.json.\n\n"
               "Example: mogu train-expert --model M --expert glad --affirm runs/data/unsafety_affirm.json "
               f"--reject runs/data/unsafety_reject.json --out runs/glad\n{EXPLAIN_M}")
    _model_args(e)
    g = e.add_argument_group("expert")
    g.add_argument("--expert", required=True, choices=["glad", "unwill"],
                   help="glad learns to comply (CE(affirm)/CE(reject)), unwill to refuse (CE(reject)/CE(affirm)) "
                        "(required)")
    g.add_argument("--affirm", required=True, help="compliant answers, JSON/JSONL rows (required)")
    g.add_argument("--reject", required=True, help="refusing answers to the same instructions (required)")
    g.add_argument("--r", type=int, default=EXPERT_DEFAULTS["r"], help="LoRA rank (default: %(default)s, published)")
    g.add_argument("--lora-alpha", type=float, default=EXPERT_DEFAULTS["lora_alpha"],
                   help="LoRA alpha; scaling = alpha / r (default: %(default)s, published)")
    g.add_argument("--lora-dropout", type=float, default=EXPERT_DEFAULTS["lora_dropout"],
                   help="LoRA dropout (default: %(default)s, published)")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help="module-name suffixes to adapt (default: the family's attention output projection: "
                        "self_attn.o_proj for Llama/Mistral/Qwen2, self_attention.dense for Falcon)")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="only these target-module indices get LoRA (MoGU v2 layer selection; see mogu probe) "
                        "(default: all)")
    _data_args(g)
    _run_args(e, "--pairs-per-step", EXPERT_DEFAULTS["pairs_per_step"], "pairs per optimizer step",
              EXPERT_DEFAULTS["lr"], EXPERT_DEFAULTS["epochs"])
    e.set_defaults(func=_train_expert)

    r = subparsers.add_parser(
        "train-router", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="stage 2: train the routers over two trained experts",
        description="Stage 2: patch the model, load both experts, freeze everything but the router heads and "
                    "train with CE(response) + lam * [mean((a - t_a)^2) + mean((b - t_b)^2)] over all patched "
                    "layers and tokens (label 1: t_a=1, t_b=0; label 0: t_a=0, t_b=1). Writes the mogu format "
                    "(mogu.load / mogu.from_pretrained) and a folded deployment copy in <out>/folded.",
        epilog=_FORMATS + " --labels is a JSON list (or JSONL) of 0/1 aligned with --data: 1 malicious "
               "(route to unwill), 0 benign (route to glad); without --labels every row needs a 0/1 'label'.\n\n"
               "Example: mogu train-router --model M --glad runs/glad --unwill runs/unwill "
               "--data runs/data/router_data.json --labels runs/data/router_labels.json --out runs/router\n"
               f"{EXPLAIN_M}\nMulti-GPU: accelerate launch -m mogu.cli train-router ...")
    _model_args(r)
    g = r.add_argument_group("router")
    g.add_argument("--glad", required=True, help="glad expert, a peft adapter folder (required)")
    g.add_argument("--unwill", required=True, help="unwill expert, a peft adapter folder (required)")
    g.add_argument("--data", required=True, help="JSON/JSONL rows {instruction, output} (required)")
    g.add_argument("--labels", default=None, help="JSON list of 0/1 aligned with --data (default: each row's 'label')")
    g.add_argument("--router", default=None,
                   help="start from this published router file (<step>_router.pth) (default: fresh heads)")
    g.add_argument("--router-hidden", type=int, default=None,
                   help=f"width of fresh router heads (default: {ROUTER_DEFAULTS['router_hidden']}, published)")
    g.add_argument("--lam", type=float, default=ROUTER_DEFAULTS["lam"],
                   help="weight of the gate loss (default: %(default)s, published)")
    g.add_argument("--gate-tokens", choices=("all", "prompt"), default="all",
                   help="tokens the gate loss covers: all (published) or the prompt only, so the router learns "
                        "the request and not the reply's wording (default: %(default)s)")
    g.add_argument("--expert-dropout", type=float, default=0.0,
                   help="LoRA dropout on the frozen experts; 0 runs the fused op (default: %(default)s)")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help="module-name suffixes the experts adapt (default: the family's attention output projection)")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="target-module indices that carry MoGU (default: those the expert adapters cover)")
    g.add_argument("--joint", action="store_true",
                   help="MoGU v2 joint adaptation: train the experts together with the routers (default: off)")
    g.add_argument("--expert-lr", type=float, default=None,
                   help="learning rate of the experts with --joint (default: --lr)")
    _data_args(g)
    _run_args(r, "--examples-per-step", ROUTER_DEFAULTS["examples_per_step"],
              "examples per optimizer step (gradient accumulation)", ROUTER_DEFAULTS["lr"], ROUTER_DEFAULTS["epochs"])
    r.set_defaults(func=_train_router)


def _check_common(args, command: str) -> None:
    """Options, output folder, tokenizer and model path, checked before the model loads."""
    from ..training.loop import output_state

    check_positive(args, "batch_size", "epochs", "max_steps", "max_length", "save_steps", "save_total_limit")
    per_step = "pairs_per_step" if command == "train-expert" else "examples_per_step"
    check_positive(args, per_step)
    if getattr(args, per_step) % args.batch_size:
        raise ValueError(f"--{per_step.replace('_', '-')} {getattr(args, per_step)} must be a multiple of "
                         f"--batch-size {args.batch_size}")
    args.out = check_out(args.out)
    output_state(args.out, args.overwrite, args.resume)      # FileExistsError / no checkpoint to resume
    args.tokenizer = check_tokenizer(args.tokenizer)
    check_model(args, command)


def _common(args) -> dict:
    return dict(batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                max_length=args.max_length, system=args.system, save_steps=args.save_steps,
                save_total_limit=args.save_total_limit, seed=args.seed, shuffle=not args.no_shuffle,
                weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, bf16=args.bf16,
                gradient_checkpointing=args.gradient_checkpointing, overwrite=args.overwrite, resume=args.resume,
                progress=not args.no_progress)


def _train_expert(args) -> int:
    from ..training import data as mdata
    from ..training import train_expert

    mdata.load_pairs(args.affirm, args.reject)                 # the data files, before the model loads
    _check_common(args, "train-expert")
    model, tokenizer = load_training_model(args)
    result = train_expert(model, tokenizer, args.expert, args.affirm, args.reject, args.out, r=args.r,
                          lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=args.target_modules, layers=args.layers, pairs_per_step=args.pairs_per_step,
                          **_common(args))
    print(f"{args.expert} expert: {result.global_step} steps -> {result.output_dir} (log {result.log_file})")
    return 0


def _train_router(args) -> int:
    from ..training import data as mdata
    from ..training import FOLDED_DIR, train_router

    args.glad = check_adapter_folder(args.glad, "glad")
    args.unwill = check_adapter_folder(args.unwill, "unwill")
    mdata.load_labelled(args.data, args.labels)                # the data files, before the model loads
    if args.router is not None:
        check_files([args.router], "router file (--router)")
    _check_common(args, "train-router")
    model, tokenizer = load_training_model(args)
    result = train_router(model, tokenizer, args.glad, args.unwill, args.data, args.out, labels=args.labels,
                          router=args.router, router_hidden=args.router_hidden, target_modules=args.target_modules,
                          layers=args.layers, joint=args.joint, expert_lr=args.expert_lr, lam=args.lam,
                          gate_tokens=args.gate_tokens, expert_dropout=args.expert_dropout,
                          examples_per_step=args.examples_per_step,
                          **_common(args))
    out = os.path.normpath(result.output_dir)
    print(f"routers: {result.global_step} steps -> {out} (folded copy in {os.path.join(out, FOLDED_DIR)}; "
          f"log {result.log_file})")
    return 0
