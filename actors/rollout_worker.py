"""What the rollout actor asks of each vLLM worker, mixed into vLLM's worker class.

vLLM builds its workers with `worker_extension_cls` as an extra base class, so the actor can
call these methods by name (`llm.collective_rpc("load_safetensors_bytes", ...)`). A call by
name travels as plain msgpack; a callable would have to be pickled, which vLLM allows only
with VLLM_ALLOW_INSECURE_SERIALIZATION=1 - a switch that lets any peer on vLLM's IPC run code
in the workers. Keeping to named methods is what lets the rollout actor leave it off.
"""

from __future__ import annotations

# The qualified name vLLM imports in each worker process.
EXTENSION = "actors.rollout_worker.RolloutWorkerExtension"


class RolloutWorkerExtension:
    """Methods a vLLM worker gains (`self` is the worker: `self.model_runner` is its model)."""

    def load_safetensors_bytes(self, payload: bytes) -> int:
        """Loads HF-named weights (safetensors bytes) into this worker's model; returns how
        many tensors it loaded. Bytes, not tensors: tensors reach a worker through msgpack as
        nested lists, bytes keep names, shapes and dtypes."""
        from safetensors.torch import load

        weights = load(payload)
        # reload_weights, not model.load_weights: on CPU vLLM repacks linear weights after
        # loading (the packed parameters lose their weight_loader); the reload path restores
        # the checkpoint layout, loads, repacks, and clears this worker's encoder and
        # multimodal caches. A layer absent from `weights` keeps its old values; a layer given
        # in part is not supported.
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)
