"""MoGU throughput: the layer at decode and prefill shapes, and (optionally) generation.

    python benchmarks/throughput.py                  # CPU, fp32, about 2 minutes on 2 cores
    python benchmarks/throughput.py --threads 1,2    # each shape at 1 and at 2 threads
    python benchmarks/throughput.py --device cuda    # bf16, d=4096, do_bench (see cuda_layer_bench.py)
    python benchmarks/throughput.py --generation     # add the model-level rows
    python benchmarks/throughput.py --shapes 3x64x48 --repeats 1   # chosen shapes (the README test's run)
    python benchmarks/throughput.py --dtype bf16 --threads 1       # the CPU rows in bf16 (or fp16)

CPU protocol (benchmarks/timing.py). Every shape is timed in two modes:

* ``warm``: the same layer's weights call after call (what a micro-benchmark sees);
* ``model``: a stack of distinct layers (``--stack-mib``, 384 MiB by default: 24 layers of
  K=N=2048 fp32, 6 of K=N=4096; at most 24 layers; the same bytes in bf16/fp16, still at most 24),
  called in turn across all the compared
  implementations, so each call finds its weights out of cache the way each layer of a
  model does during decode.

The implementations (``base`` = ``F.linear``, the published unfused layer, ``mogu_linear``
on every CPU backend) are interleaved inside every repetition in this one process, after a
warm-up of each at every shape (and a longer one before the first), and repeated until
every median is stable (its ~95% confidence interval within +-``--tol``), between
``--min-repeats`` and ``--repeats`` repetitions (or ``--max-seconds``; rows that hit a cap
first are marked). The table gives min / median / max per call and the
ratio of medians to ``F.linear`` of the same shape and mode (ratios, not lone absolute
times, are what transfers between machines). The fixed cost of one call (a tiny shape,
where the kernels take no time) is measured the same way. A warning is printed when the
load average or the CPU time of other processes shows other work. Writes a JSON file and,
when matplotlib is installed, a PNG plot next to it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mogu_kernels  # noqa: E402
from mogu_kernels import extension as mogu_extension  # noqa: E402
from layer_impls import layer_impls, make_layer_weights  # noqa: E402
from timing import LoadMonitor, device_model, last_level_cache_bytes, spread, time_interleaved  # noqa: E402

CPU_SHAPES = [  # (M, K, N): decode rows, then prefill
    (1, 4096, 4096), (16, 4096, 4096), (1, 2048, 2048), (16, 2048, 2048), (128, 2048, 2048), (512, 2048, 2048),
]
QUICK_SHAPES = [(1, 1024, 1024), (16, 1024, 1024)]
CALL_COST_SHAPE = (1, 64, 64)      # M, K, N where the fixed cost of a call dominates
MAX_LAYERS = 24


def parse_shapes(text: str) -> List[tuple]:
    """"MxKxN,MxKxN,..." -> [(M, K, N), ...], each a positive integer (argparse type)."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected MxKxN with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_threads(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2, got {text!r}")
    return values


def machine_name(device: str, dtype: str = "fp32") -> str:
    """The device and, on CPU, its model, threads and (bf16) the extension's bf16 path, which
    decides the bf16 timings: oneDNN's brgemm on CPUs with AMX, the generic kernels otherwise."""
    if device == "cuda":
        return device_model(device)
    name = f"{device_model()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"
    if dtype == "bf16" and mogu_extension._C is not None:
        name += f", bf16 path {mogu_extension._C.cpu_bf16_path()}"
    return name


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stack_layers(K: int, N: int, stack_mib: float, elem_bytes: int = 4) -> int:
    """Layers in the "model" stack: enough base weights of ``elem_bytes`` per element for
    ``stack_mib``, 2 to 24."""
    return max(2, min(MAX_LAYERS, math.ceil(stack_mib * 2 ** 20 / (K * N * elem_bytes))))


def cpu_layer_rows(shapes, r: int, backends: List[str], *, stack_mib: float = 384.0, timing: dict,
                   threads: int, first_warmup: float = 0.5, dtype=torch.float32, log=print) -> List[dict]:
    """Rows of both modes for every shape (see the module docstring), x and the layer
    weights in ``dtype`` (the folded router vectors fp32, as the patched module passes them)."""
    rows = []
    llc = last_level_cache_bytes()
    elem = torch.empty((), dtype=dtype).element_size()
    for i, (M, K, N) in enumerate(shapes):
        L = stack_layers(K, N, stack_mib, elem)
        stack = [make_layer_weights(K, N, r, dtype, "cpu", seed=layer) for layer in range(L)]
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M * K)).to(dtype)
        per_layer = [layer_impls(w, backends) for w in stack]
        names = list(per_layer[0])
        bound = {name: [(lambda fn=layers[name]: fn(x)) for layers in per_layer] for name in names}
        if L * K * N * elem < 2 * llc:
            log(f"  note: the {L}-layer stack ({L * K * N * elem / 2**20:.1f} MiB) is not over twice the "
                f"{llc / 2**20:.0f} MiB cache: its 'model' rows are not cold")
        with torch.no_grad():
            for mode in ("warm", "model"):
                cold = mode == "model"
                impls = bound if cold else {name: fns[:1] for name, fns in bound.items()}
                warmup = first_warmup if i == 0 and mode == "warm" else timing.get("warmup", 0.1)
                res = time_interleaved(impls, cold=cold, **{**timing, "warmup": warmup})
                base_med = statistics.median(res["samples"]["base"])
                line = []
                for name in names:
                    lo, med, hi = spread(res["samples"][name])
                    rows.append({"kind": "layer", "shape": f"M={M},K={K},N={N},r={r}", "M": M, "K": K, "N": N,
                                 "dtype": str(dtype).replace("torch.", ""), "impl": name, "mode": mode,
                                 "layers": L if cold else 1, "threads": threads,
                                 "ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
                                 "repeats": res["repeats"], "stable": res["stable"],
                                 "ratio_to_base": med / base_med})
                    line.append(f"{name} {med * 1e3:.3f}ms" if name == "base" else f"{name} {med / base_med:.2f}x")
                log(f"  M={M} K={K} N={N} {mode:<5} ({L if cold else 1} layer{'s' if cold else ''}, "
                    f"{res['repeats']} reps{'' if res['stable'] else ', NOT stable'}): " + "  ".join(line))
        del stack, per_layer, bound
        gc.collect()
    return rows


def call_cost_rows(backends: List[str], *, timing: dict, threads: int, dtype=torch.float32) -> List[dict]:
    """Microseconds per call at a tiny shape (the fixed cost: argument handling, dispatch,
    allocation, thread start-up), ``F.linear`` against ``mogu_linear`` (default backend and
    each one named) and, when the extension is built, its op called directly."""
    M, K, N = CALL_COST_SHAPE
    w = make_layer_weights(K, N, 8, dtype, "cpu", hidden=16)
    x = torch.randn(M, K).to(dtype)
    args = (x, w["weight"], w["bias"], w["lora_A"], w["lora_B"], w["router_weight"], w["router_bias"], w["scaling"])
    impls: Dict[str, Callable] = {"F.linear": lambda: F.linear(x, w["weight"], w["bias"]),
                                  "mogu_linear": lambda: mogu_kernels.mogu_linear(*args)}
    for b in backends:
        impls[f"mogu_linear backend={b}"] = lambda b=b: mogu_kernels.mogu_linear(*args, backend=b)
    if "cpp" in backends:
        op = torch.ops.mogu_C.mogu_linear.default
        impls["torch.ops.mogu_C.mogu_linear"] = lambda: op(*args, None)
    with torch.no_grad():
        res = time_interleaved({k: [v] for k, v in impls.items()}, cold=False,
                               **{**timing, "min_time": 0.005, "max_seconds": min(5.0, timing.get("max_seconds", 5.0))})
    rows = []
    for name in impls:
        lo, med, hi = spread(res["samples"][name])
        rows.append({"impl": name, "shape": f"M={M},K={K},N={N}", "dtype": str(dtype).replace("torch.", ""),
                     "threads": threads, "us": med * 1e6,
                     "min_us": lo * 1e6, "max_us": hi * 1e6, "repeats": res["repeats"]})
    return rows


def print_layer_table(rows: List[dict], title: str) -> None:
    """Summary (ratio of medians per impl, warm / model) then the spread of every row."""
    print(f"\n{title}")
    shapes = list(dict.fromkeys((r["threads"], r["shape"]) for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "base"]
    cell = {(r["threads"], r["shape"], r["mode"], r["impl"]): r for r in rows}
    width = max(16, max(len(i) for i in impls) + 2)
    print(f"{'threads':>7}  {'shape':<24}{'base ms warm/model':>22}" + "".join(f"{i:>{width}}" for i in impls))
    for t, s in shapes:
        bw, bm = cell.get((t, s, "warm", "base")), cell.get((t, s, "model", "base"))
        base = f"{bw['ms']:.3f} / {bm['ms']:.3f}" if bw and bm else "-"
        line = f"{t:>7}  {s:<24}{base:>22}"
        for i in impls:
            w, m = cell.get((t, s, "warm", i)), cell.get((t, s, "model", i))
            text = (f"{w['ratio_to_base']:.2f}x / {m['ratio_to_base']:.2f}x" if w and m else "-")
            line += f"{text:>{width}}"
        print(line)
    print("\nspread per call, ms (min / median / max over the repetitions; model = a stack of N layers)")
    print(f"{'threads':>7}  {'shape':<24}{'mode':<11}{'reps':>5}  {'impl':<18}{'min':>9}{'median':>9}{'max':>9}"
          f"{'x base':>8}")
    for t, s in shapes:
        for mode in ("warm", "model"):
            first = True
            for i in ["base"] + impls:
                r = cell.get((t, s, mode, i))
                if r is None:
                    continue
                label = mode if mode == "warm" else f"model({r['layers']})"
                head = f"{t:>7}  {s:<24}{label:<11}{r['repeats']:>4}{'' if r['stable'] else '*'}" if first \
                    else " " * 48
                print(f"{head:<48}  {i:<18}{r['min_ms']:>9.3f}{r['ms']:>9.3f}{r['max_ms']:>9.3f}"
                      f"{r['ratio_to_base']:>7.2f}x")
                first = False
    if any(not r["stable"] for r in rows):
        print("* median not yet stable when the repetition or time cap was reached")


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
    shapes = list(dict.fromkeys((r.get("threads"), r["shape"]) for r in rows))
    series = [(i, m) for i, m in dict.fromkeys((r["impl"], r.get("mode")) for r in rows) if i != "base"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(shapes)), 4))
    width = 0.8 / max(1, len(series))
    for j, (impl, mode) in enumerate(series):
        ratios = [next((r["ratio_to_base"] for r in rows if (r.get("threads"), r["shape"]) == s
                        and r["impl"] == impl and r.get("mode") == mode), float("nan")) for s in shapes]
        ax.bar([i + j * width for i in range(len(shapes))], ratios, width,
               label=impl if mode is None else f"{impl} ({mode})")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
    ax.set_xticklabels([s.replace(",", "\n", 1) + ("" if t is None else f"\n{t} thr") for t, s in shapes],
                       fontsize=7)
    ax.set_ylabel("time / base F.linear (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="dtype of x and the layer weights for the CPU rows (default fp32; the CUDA rows are bf16)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank for the CPU rows (default 8)")
    p.add_argument("--repeats", type=int, default=25,
                   help="at most this many interleaved repetitions per shape and mode (default 25)")
    p.add_argument("--min-repeats", type=int, default=5,
                   help="at least this many (default 5; capped by --repeats), then stop once stable")
    p.add_argument("--tol", type=float, default=0.03,
                   help="stable: the ~95%% confidence interval of every median within +-this fraction "
                        "(default 0.03)")
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="stop repeating a shape and mode after this long (default 10)")
    p.add_argument("--stack-mib", type=float, default=384.0,
                   help="fp32 base weights in the 'model' stack of distinct layers (default 384: 24 x 2048^2)")
    p.add_argument("--threads", type=parse_threads, default=None, metavar="N[,N...]",
                   help="CPU thread counts to run every shape at (default: torch's, "
                        f"{torch.get_num_threads()} here)")
    p.add_argument("--quick", action="store_true", help="small shapes and 3 repetitions (smoke test)")
    p.add_argument("--shapes", type=parse_shapes, default=None, metavar="MxKxN[,MxKxN...]",
                   help="the CPU layer shapes instead of the built-in decode/prefill list (e.g. 1x64x48)")
    p.add_argument("--generation", action="store_true", help="add model-level generation rows")
    p.add_argument("--model", default=None, help="local model folder for the generation rows")
    p.add_argument("--json", default="bench_results/throughput.json", help="where to write the results")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.repeats < 1 or args.min_repeats < 1:
        p.error("--repeats and --min-repeats must be at least 1")
    backends = [b for b in mogu_kernels.available_backends(args.device)
                if not (args.device == "cpu" and b == "triton")]   # the interpreter is a test tool: not timed
    thread_counts = args.threads or [torch.get_num_threads()]
    monitor = LoadMonitor(threads=max(thread_counts))
    machine = machine_name(args.device, args.dtype)
    dtype = DTYPES[args.dtype]
    title = f"MoGU layer, {args.device} ({machine}), torch {torch.__version__}" + (
        f", {args.dtype}" if args.device == "cpu" else "")
    print(title)
    print(f"backends: {backends}")
    warning = monitor.start_warning()
    if warning:
        print(warning)
    call_cost: List[dict] = []
    if args.device == "cuda":
        from cuda_layer_bench import run_cuda_layer_rows
        rows = run_cuda_layer_rows(backends)
        for r in rows:
            r.setdefault("kind", "layer")
        print_table(rows, "layer time and ratio to base F.linear (bf16)")
    else:
        shapes = args.shapes or (QUICK_SHAPES if args.quick else CPU_SHAPES)
        timing = {"min_repeats": 3 if args.quick else args.min_repeats,
                  "max_repeats": 3 if args.quick else args.repeats, "tol": args.tol,
                  "max_seconds": 2.0 if args.quick else args.max_seconds}
        stack_mib = min(args.stack_mib, 16.0) if args.quick else args.stack_mib
        rows = []
        default_threads = torch.get_num_threads()
        try:
            for t in thread_counts:
                torch.set_num_threads(t)
                print(f"\n{t} thread{'s' if t > 1 else ''}: fixed cost of one call, "
                      f"M,K,N = {','.join(map(str, CALL_COST_SHAPE))} (us; min / median / max)")
                for c in call_cost_rows(backends, timing=timing, threads=t, dtype=dtype):
                    print(f"  {c['impl']:<34}{c['min_us']:>8.1f}{c['us']:>8.1f}{c['max_us']:>8.1f}")
                    call_cost.append(c)
                print(f"{t} thread{'s' if t > 1 else ''}: layer shapes (warm, then model)")
                rows += cpu_layer_rows(shapes, args.r, backends, stack_mib=stack_mib, timing=timing, threads=t,
                                       first_warmup=0.1 if args.quick else 0.5, dtype=dtype)
        finally:
            torch.set_num_threads(default_threads)
        print_layer_table(rows, f"layer time, ratio to base F.linear ({args.dtype}): median ratio warm / model "
                                "(model = each call's weights out of cache, as in a model)")

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

    load = monitor.stop()
    print(f"\nmachine load: {monitor.describe()}")
    warning = monitor.warning()
    if warning:
        print(warning)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "device": args.device, "dtype": args.dtype if args.device == "cpu" else "bf16",
                   "torch": torch.__version__, "load": load,
                   "call_cost": call_cost, "rows": rows}, f, indent=2)
    png = os.path.splitext(args.json)[0] + ".png"
    layer_rows = [r for r in rows if r.get("kind") == "layer"]
    wrote_png = plot(layer_rows, png, title)
    print(f"\nwrote {args.json}" + (f" and {png}" if wrote_png else " (no plot: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
