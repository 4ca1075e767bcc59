"""DeepSpeed checkpoints read back without unpickling arbitrary objects.

Owns the one change to how a training rank reads its checkpoint: DeepSpeed's torch checkpoint
engine calls `torch.load(weights_only=False)`, which runs whatever code a tampered `.pt` file
carries. Inside `weights_only_loads(engine)` every file DeepSpeed reads goes through
`torch.load(weights_only=True)` instead, with only the DeepSpeed classes its own checkpoints
hold (the ZeRO stage enum, the loss scaler) allowed beside tensors and plain containers. Must
not change what is saved, nor load anything itself.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager

import torch


def _trusted_classes() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its own checkpoints (found by loading real
    ZeRO-0/3 checkpoints with weights_only=True until nothing was refused)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_weights_only(path: str, map_location=None):
    """`torch.load(path, weights_only=True)` with DeepSpeed's own classes allowed.

    Raises:
        pickle.UnpicklingError: the file holds any other global (a class, a function, a
            `__reduce__` payload), named in the message with the file; nothing of it is run.
    """
    with torch.serialization.safe_globals(_trusted_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            refused = str(exc).split("Unsupported global:")[-1].split(" was not")[0].strip()
            raise pickle.UnpicklingError(
                f"checkpoint file {path} holds {refused}, which a DeepSpeed checkpoint of this "
                "project never does: refused (nothing of it was run). Resume only from "
                "checkpoints your own runs wrote.") from exc


@contextmanager
def weights_only_loads(engine):
    """While inside, `engine` (a DeepSpeedEngine) reads every checkpoint file with
    `load_weights_only`: its checkpoint engine's `load` is shadowed on the instance."""
    io = engine.checkpoint_engine
    io.load = load_weights_only
    try:
        yield
    finally:
        del io.load  # back to the class's own method
