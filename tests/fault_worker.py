"""Test helper for tests/test_faults.py: run one job in a separate process and SIGKILL it.

    python tests/fault_worker.py '<json spec>'

spec: {"job": "expert" | "router" | "build" | "eval", "kwargs": {...} (passed on, paths as
strings), "kill": {"at": "step" | "save" | "generate", "n": N} or null, "release": folder
(router and eval jobs), "instructions": file (build and eval jobs)}.

The process kills itself with SIGKILL (no cleanup, no atexit, no flush: as ``kill -9``) at
a chosen, reproducible point:

* ``step``: at the start of the N-th optimizer step (earlier checkpoints are complete);
* ``save``: in the middle of the N-th checkpoint save (the weights written, optimizer.bin
  not: a partial ``step-N.tmp`` folder is left behind);
* ``generate``: at the N-th generation batch (build-data / eval), after appending half a
  JSON line to the output's JSONL file, as a kill in the middle of a write would.

Everything is built exactly as the in-process runs of the test build it (tiny_models,
tiny_tokenizer, one torch thread), so the killed-and-resumed run can be compared bitwise.
"""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import tiny_llama  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(kill, out) -> None:
    if not kill:
        return
    at, n = kill["at"], int(kill["n"])
    count = [0]
    if at == "step":
        real = torch.optim.AdamW.step

        def step(self, *a, **k):
            count[0] += 1
            if count[0] == n:
                die()
            return real(self, *a, **k)
        torch.optim.AdamW.step = step
    elif at == "save":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)) and os.path.basename(f) == "optimizer.bin":   # accelerate save_state
                count[0] += 1
                if count[0] == n:
                    die()
            return real_save(obj, f, *a, **k)
        torch.save = save
    elif at == "generate":
        from mogu.evaluation import data_building, evaluator

        def wrap(module, name, jsonl):
            real = getattr(module, name)

            def fn(*a, **k):
                count[0] += 1
                if count[0] == n:
                    with open(os.path.join(out, jsonl), "a", encoding="utf-8") as f:
                        f.write('{"key": "half a li')
                        f.flush()
                    die()
                return real(*a, **k)
            setattr(module, name, fn)
        wrap(data_building, "generate_answers", "generations.jsonl")
        wrap(evaluator, "_generate_base", "responses.jsonl")
        wrap(evaluator, "_generate_mogu", "responses.jsonl")
    else:
        raise ValueError(f"unknown kill point {at!r}")


def main(spec) -> None:
    import mogu

    torch.set_num_threads(1)
    kw = dict(spec.get("kwargs", {}))
    out = kw.get("out")
    install_kill(spec.get("kill"), out)
    tok = tiny_tokenizer()
    job = spec["job"]
    if job == "expert":
        mogu.train_expert(tiny_llama(), tok, **kw)
    elif job == "router":
        mogu.train_router(tiny_llama(), tok, **kw)
    elif job == "build":
        mogu.build_data(tiny_llama(), tok, **kw)
    elif job == "eval":
        model = mogu.load(tiny_llama(), spec["release"])
        mogu.evaluate(model, tok, **kw)
    else:
        raise ValueError(f"unknown job {job!r}")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
