"""Test helper run as a subprocess by tests/test_vllm.py: serve a folder with ``vllm.LLM``
and write the greedy tokens as JSON.

    python tests/vllm_worker.py REQUEST.json RESULT.json

REQUEST: {"model": DIR, "prompts": [[ids], ...], "max_tokens": n, "dtype": "float32",
"tensor_parallel_size": 1, "max_model_len": 256, "exact": false, "eager": true, "logprobs": 0}. RESULT:
{"tokens": [[ids], ...] (protocol always), "architecture": the class vLLM ran, with "exact":
protocol exact's tokens and "always_again": protocol always after it, and with "logprobs" k > 0:
"logprobs": per prompt, per step, [[token, logprob], ...] (the chosen token first, then the
top k; vLLM's raw fp32 log-softmax of the model's logits)}. vLLM starts its engine processes with spawn, hence
the ``__main__`` guard; one process per engine keeps engines (and their thread binding)
apart.
"""
import json
import sys
import time


def main(request_path: str, result_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(model=req["model"], dtype=req.get("dtype", "float32"), enforce_eager=req.get("eager", True),
              max_model_len=req.get("max_model_len", 256),
              gpu_memory_utilization=req.get("gpu_memory_utilization", 0.2),
              tensor_parallel_size=req.get("tensor_parallel_size", 1), seed=0,
              worker_extension_cls="mogu.vllm_plugin.worker.MoGUWorkerExtension")
    loaded = time.time()
    k = int(req.get("logprobs") or 0)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True, logprobs=k or None)
    prompts = [{"prompt_token_ids": ids} for ids in req["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.time()
    config = llm.llm_engine.model_config
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "architecture": list(getattr(config, "architectures", None) or config.hf_config.architectures),
              "load_s": loaded - start, "generate_s": done - loaded}
    if k:
        result["logprobs"] = [
            [[[tok, step[tok].logprob]] + sorted(([t, lp.logprob] for t, lp in step.items() if t != tok),
                                                 key=lambda p: -p[1])
             for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in outputs]
        params = params.clone()
        params.logprobs = None          # protocol exact below compares tokens only
    if req.get("exact"):            # protocol "exact" (two phases) on the same engine, then "always" again
        from mogu.vllm_plugin import generate_exact
        result["exact"] = [r["token_ids"] for r in generate_exact(llm, prompts, params)]
        again = llm.generate(prompts, params, use_tqdm=False)
        result["always_again"] = [list(o.outputs[0].token_ids) for o in again]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
