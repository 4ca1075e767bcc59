"""Checkpoint files are read with torch.load(weights_only=True): a tampered file's pickled code
is refused, not run; DeepSpeed's own checkpoints still load (the resume tests in tests/e2e and
tests/reliability read real ZeRO-0 (SFT) and ZeRO-3 checkpoints through
`PolicyActor.load_checkpoint`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from actors.safe_checkpoint import load_weights_only, weights_only_loads


class _Payload:
    """What a tampered checkpoint could carry: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickled_payload_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"step": 3}, "evil": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="holds GLOBAL getattr.*refused"):
        load_weights_only(str(path), map_location="cpu")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what DeepSpeed's own engine would do: it runs
    assert marker.exists()


def test_deepspeed_classes_and_tensors_load():
    import io

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    buffer = io.BytesIO()
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                "fp32": torch.arange(4.0)}, buffer)
    buffer.seek(0)
    state = load_weights_only(buffer)
    assert state["zero_stage"] is ZeroStageEnum.weights and state["loss_scaler"].cur_scale == 1.0
    assert torch.equal(state["fp32"], torch.arange(4.0))


def test_the_engine_reads_through_it_only_inside():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class Engine:  # the one attribute weights_only_loads touches on a DeepSpeedEngine
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    with weights_only_loads(engine):
        assert engine.checkpoint_engine.load is load_weights_only
    assert engine.checkpoint_engine.load.__func__ is TorchCheckpointEngine.load
