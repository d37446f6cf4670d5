"""MoGU throughput: the layer at decode and prefill shapes, and (optionally) generation.

    python benchmarks/throughput.py                  # CPU, fp32, ~1-2 minutes on 2 cores
    python benchmarks/throughput.py --device cuda    # bf16, d=4096, do_bench (see cuda_layer_bench.py)
    python benchmarks/throughput.py --generation     # add the model-level rows
    python benchmarks/throughput.py --shapes 3x64x48 --repeats 1   # chosen shapes (the README test's run)

Every number is a median over interleaved repetitions in this one process, reported as a
ratio to the base ``F.linear`` of the same shape (ratios, not lone absolute times, are
what transfers between machines). Writes a JSON file and, when matplotlib is installed,
a PNG plot next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mogu_kernels  # noqa: E402
from layer_impls import layer_impls, make_layer_weights  # noqa: E402

CPU_SHAPES = [  # (M, K, N): decode rows, then prefill
    (1, 4096, 4096), (16, 4096, 4096), (1, 2048, 2048), (16, 2048, 2048), (128, 2048, 2048), (512, 2048, 2048),
]


def parse_shapes(text: str) -> List[tuple]:
    """"MxKxN,MxKxN,..." -> [(M, K, N), ...], each a positive integer (argparse type)."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected MxKxN with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"


def cpu_time_interleaved(impls: Dict[str, Callable], x: torch.Tensor, repeats: int,
                         min_time: float = 0.01) -> Dict[str, float]:
    """Median seconds per call of each impl; impls alternate inside every repetition."""
    with torch.no_grad():
        inner = {}
        for name, fn in impls.items():            # warm up, and size the inner loop to ~min_time
            fn(x)
            t0 = time.perf_counter()
            fn(x)
            inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
        times = {name: [] for name in impls}
        for _ in range(repeats):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn(x)
                times[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_layer_rows(shapes, r: int, repeats: int, backends: List[str]) -> List[dict]:
    rows = []
    for M, K, N in shapes:
        w = make_layer_weights(K, N, r, torch.float32, "cpu")
        x = torch.randn(M, K)
        medians = cpu_time_interleaved(layer_impls(w, backends), x, repeats)
        for impl, sec in medians.items():
            rows.append({"kind": "layer", "shape": f"M={M},K={K},N={N},r={r}", "M": M, "impl": impl,
                         "ms": sec * 1e3, "ratio_to_base": sec / medians["base"]})
    return rows


def print_table(rows: List[dict], title: str) -> None:
    print(f"\n{title}")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = max(len(i) for i in impls) + 2
    print(f"{'shape':<28}" + "".join(f"{i:>{max(width, 16)}}" for i in impls))
    for s in shapes:
        cells = {r["impl"]: r for r in rows if r["shape"] == s}
        line = f"{s:<28}"
        for i in impls:
            c = cells.get(i)
            w = max(width, 16)
            line += f"{'-':>{w}}" if c is None else f"{c['ms']:>{w - 9}.3f}ms {c['ratio_to_base']:>5.2f}x"
        print(line)


def plot(rows: List[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "base"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(shapes)), 4))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ratios = [next((r["ratio_to_base"] for r in rows if r["shape"] == s and r["impl"] == impl), float("nan"))
                  for s in shapes]
        ax.bar([i + j * width for i in range(len(shapes))], ratios, width, label=impl)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
    ax.set_xticklabels([s.replace(",", "\n", 1) for s in shapes], fontsize=7)
    ax.set_ylabel("time / base F.linear (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--r", type=int, default=8, help="LoRA rank for the CPU rows (default 8)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repetitions per shape (default 15)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke test)")
    p.add_argument("--shapes", type=parse_shapes, default=None, metavar="MxKxN[,MxKxN...]",
                   help="the CPU layer shapes instead of the built-in decode/prefill list (e.g. 1x64x48)")
    p.add_argument("--generation", action="store_true", help="add model-level generation rows")
    p.add_argument("--model", default=None, help="local model folder for the generation rows")
    p.add_argument("--json", default="bench_results/throughput.json", help="where to write the results")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    backends = [b for b in mogu_kernels.available_backends(args.device)
                if not (args.device == "cpu" and b == "triton")]   # the interpreter is a test tool: not timed
    machine = machine_name(args.device)
    title = f"MoGU layer, {args.device} ({machine}), torch {torch.__version__}"
    print(title)
    print(f"backends: {backends}")
    if args.device == "cuda":
        from cuda_layer_bench import run_cuda_layer_rows
        rows = run_cuda_layer_rows(backends)
        for r in rows:
            r.setdefault("kind", "layer")
    else:
        shapes = args.shapes or (CPU_SHAPES[:3] if args.quick else CPU_SHAPES)
        rows = cpu_layer_rows(shapes, args.r, 3 if args.quick else args.repeats, backends)
    print_table(rows, f"layer time and ratio to base F.linear ({'bf16' if args.device == 'cuda' else 'fp32'})")

    if args.generation:
        from generation_bench import run_generation_rows
        gen_rows = run_generation_rows(model_path=args.model, device=args.device)
        print("\ngeneration (prompt 256, 64 new tokens; ratios to plain base generate)")
        print(f"{'impl':<14}{'TTFT ms':>10}{'tok/s':>9}{'total s':>9}{'peak MB':>9}{'time x':>8}{'mem x':>7}")
        for r in gen_rows:
            r["kind"] = "generation"
            print(f"{r['impl']:<14}{r['ttft_ms']:>10.1f}{r['tokens_per_s']:>9.1f}{r['total_s']:>9.2f}"
                  f"{r['peak_mem_mb']:>9.0f}{r['ratio_to_base']:>8.3f}{r.get('mem_ratio_to_base', float('nan')):>7.3f}")
        rows += gen_rows

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=2)
    png = os.path.splitext(args.json)[0] + ".png"
    layer_rows = [r for r in rows if r.get("kind") == "layer"]
    wrote_png = plot(layer_rows, png, title)
    print(f"\nwrote {args.json}" + (f" and {png}" if wrote_png else " (no plot: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
