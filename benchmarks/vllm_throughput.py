"""vLLM offline throughput: a MoGU model against the same base model, same prompts, one run.

    python benchmarks/vllm_throughput.py --shape smollm2-135m --out runs/vllm_bench          # CPU
    python benchmarks/vllm_throughput.py --shape llama-7b --dtype bfloat16 --prompts 256 \\
        --max-tokens 128 --out runs/vllm_bench_gpu                                           # GPU row

Runs in the vLLM environment (.ci/vllm_env.sh). Both engines use vLLM's dummy weight
loader (random weights of the named shape; no download, no checkpoint on disk), so the
two runs differ only in the MoGU layers (r = 8 experts and folded routers on every
decoder layer's o_proj; the fused op at tensor parallel size 1). ``--model DIR`` instead
serves a real folder written by ``mogu export-vllm`` against its base (``--base``). Each
engine runs in its own subprocess; N random prompts of P tokens each generate M tokens
greedily (ignore_eos); the best of ``--repeats`` timed runs after one warm-up counts, and
the best engine of each kind over ``--rounds`` alternating base/MoGU engines.
Writes ``vllm_throughput.json`` (and prints a table) under ``--out``.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = {
    # SmolLM2-135M(-Instruct): the model the project trains on CPU.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # Llama-2-7B.
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    # The tests' tiny model (smoke runs).
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False),
}


def write_configs(shape: str, out: str, r: int) -> dict:
    """Two config-only folders (base, mogu) for the dummy loader; returns their paths."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from mogu.config import MoGUConfig
    from mogu.vllm_plugin.common import ARCHITECTURES, SECTION_KEY, make_section

    spec = SHAPES[shape]
    base_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", **spec}
    n = spec["num_hidden_layers"]
    mogu_cfg = dict(base_cfg, architectures=[ARCHITECTURES["LlamaForCausalLM"]])
    mogu_cfg[SECTION_KEY] = make_section(MoGUConfig(r=r, lora_alpha=2.0 * r, lora_dropout=0.0),
                                         [f"model.layers.{i}.self_attn.o_proj" for i in range(n)],
                                         "mogu_model.safetensors")
    paths = {}
    for name, cfg in (("base", base_cfg), ("mogu", mogu_cfg)):
        folder = os.path.join(out, f"{shape}-{name}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        paths[name] = folder
    return paths


def worker(args) -> None:
    """One engine: load, warm up, time ``--repeats`` runs; print one JSON line."""
    import random

    from vllm import LLM, SamplingParams
    t0 = time.time()
    kw = dict(load_format="dummy", skip_tokenizer_init=True) if args.dummy else {}
    llm = LLM(model=args.worker, dtype=args.dtype, enforce_eager=args.eager, max_model_len=args.prompt_len
              + args.max_tokens + 8, gpu_memory_utilization=args.gpu_memory_utilization,
              tensor_parallel_size=args.tp, seed=0, **kw)
    load_s = time.time() - t0
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.prompt_len)]}
               for _ in range(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            detokenize=not args.dummy)
    llm.generate(prompts[: max(1, len(prompts) // 8)], params, use_tqdm=False)          # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.time() - t)
        assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outs)
    best = min(times)
    print("RESULT " + json.dumps({"load_s": load_s, "times_s": times, "best_s": best,
                                  "gen_tokens_per_s": args.prompts * args.max_tokens / best,
                                  "total_tokens_per_s": args.prompts * (args.max_tokens + args.prompt_len) / best}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="random-weight model shape")
    p.add_argument("--model", default=None, help="a folder written by mogu export-vllm (real weights; needs --base)")
    p.add_argument("--base", default=None, help="the plain base folder for --model")
    p.add_argument("--r", type=int, default=8, help="LoRA rank of the MoGU experts (dummy shapes)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="base/MoGU engine pairs, alternating (best of each)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="enforce_eager (no torch.compile / CUDA graphs); --no-eager on GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                   help="vLLM's memory share (on CPU: of host memory)")
    p.add_argument("--out", default="runs/vllm_bench")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dummy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.makedirs(args.out, exist_ok=True)
    if args.model:
        if not args.base:
            p.error("--model needs --base (the plain base folder)")
        folders, dummy = {"base": args.base, "mogu": args.model}, False
    else:
        folders, dummy = write_configs(args.shape, args.out, args.r), True
    rows, rounds = {}, []
    for name in ("base", "mogu") * args.rounds:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", folders[name], "--dtype", args.dtype,
               "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len), "--max-tokens",
               str(args.max_tokens), "--repeats", str(args.repeats), "--tp", str(args.tp),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--eager" if args.eager else "--no-eager"] + (["--dummy"] if dummy else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"vllm_throughput: the {name} engine failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        rounds.append(dict(row, engine=name))
        if name not in rows or row["gen_tokens_per_s"] > rows[name]["gen_tokens_per_s"]:
            rows[name] = row
        print(f"{name:5s}: {row['gen_tokens_per_s']:9.1f} generated tokens/s (best of "
              f"{args.repeats}: {row['best_s']:.2f} s; load {row['load_s']:.0f} s)", flush=True)
    ratio = rows["mogu"]["gen_tokens_per_s"] / rows["base"]["gen_tokens_per_s"]
    print(f"MoGU / base throughput (best engine of each over {args.rounds} alternating rounds): {ratio:.3f}")
    try:
        import torch
        from timing import device_model
        device = device_model("cuda:0" if torch.cuda.is_available() else "cpu")
    except Exception:
        device = "unknown"
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "dummy")},
              "weights": "dummy (random)" if dummy else "checkpoint", "folders": folders, "rows": rows,
              "rounds": rounds, "mogu_over_base": ratio,
              "machine": {"platform": platform.platform(), "device": device, "cpu_count": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()}}
    with open(os.path.join(args.out, "vllm_throughput.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
