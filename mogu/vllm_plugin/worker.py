"""``MoGUWorkerExtension``: the vLLM worker methods protocol "exact" calls by name.

Build the engine with ``vllm.LLM(DIR, worker_extension_cls=WORKER_EXTENSION)``; then
``llm.collective_rpc("mogu_set_base_mode", args=(True,))`` switches every MoGU layer of
every worker to the plain base layer (False: back to MoGU). vLLM sends only the method
name and a bool, so no pickled code crosses processes (its default serializer refuses
callables unless VLLM_ALLOW_INSECURE_SERIALIZATION=1). No vLLM import here.
"""
from __future__ import annotations

WORKER_EXTENSION = "mogu.vllm_plugin.worker.MoGUWorkerExtension"


class MoGUWorkerExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``."""

    def mogu_set_base_mode(self, base: bool) -> int:
        """Switch this worker's MoGU layers; returns how many were switched."""
        from .models import set_base_mode

        return set_base_mode(self.get_model(), bool(base))
