"""``mogu export-vllm``: a folder that ``vllm serve`` loads as a MoGU model.

    mogu export-vllm --model M [--gguf-file F] --mogu MOGU_DIR --out DIR [--dtype auto] [--overwrite]

See ``mogu.vllm_plugin.export_vllm`` (needs transformers only; vLLM is needed to serve).
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-vllm", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a folder that vLLM serves with MoGU (vllm serve DIR)",
        description="Writes the base model's weights, config and tokenizer plus the MoGU parameters (own format, "
                    "routers folded) to --out, with config.json naming the MoGU architecture (e.g. "
                    "MoGULlamaForCausalLM) and its settings. With this package installed beside vLLM, `vllm serve "
                    "DIR` and vllm.LLM(DIR) run MoGU on every token (protocol 'always'). Supported: Llama, Mistral, "
                    "Qwen2 families (MoGU on self_attn.o_proj). Every input is checked before anything is written.",
        epilog="Example: mogu export-vllm --model runs/smollm2 --mogu runs/x/router/folded --out runs/x/vllm\n"
               "         vllm serve runs/x/vllm")
    p.add_argument("--model", required=True, help="the base model: a local Hugging Face model folder, a folder "
                                                  "holding one .gguf file, or a .gguf file (required)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (default: the folder's only "
                                                     ".gguf file when it has no config.json)")
    p.add_argument("--mogu", required=True, help="MoGU folder: own format (mogu_config.json) or a published "
                                                 "release root (required)")
    p.add_argument("--out", required=True, help="output folder; must not exist or be empty (required)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: %(default)s, the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: refuse)")
    p.set_defaults(func=run_export_vllm)


def run_export_vllm(args) -> int:
    from ..vllm_plugin import export_vllm

    out = export_vllm(args.model, args.mogu, args.out, gguf_file=args.gguf_file, dtype=args.dtype,
                      overwrite=args.overwrite)
    print(f"mogu export-vllm: wrote {out}; serve it with: vllm serve {out}")
    return 0
