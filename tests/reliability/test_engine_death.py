"""vLLM's engine-core process dying under a live rollout actor (rollout.engine_process=separate,
as on a GPU): the actor must raise `EngineDied` - which GRPO's driver answers with a restart -
whether the death comes while it waits on generated tokens or before a weight reload, and must
never wait forever (vLLM 0.32's own client leaves a waiting call blocked: see
glimpseprune/vllm_engine.py's engine_death_guard).
"""

from __future__ import annotations

import threading

import psutil
import pytest

from pipeline.batch import PromptBatch
from pipeline.config import GlimpseConfig, ModelConfig, RolloutConfig, SyntheticConfig
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow


def _engine_cores() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if p.name() == "VLLM::EngineCore"]


@pytest.fixture()
def actor(tiny_model_dir):
    from actors.rollout import RolloutActor

    # Long answers (the random model rarely stops): a call lasts seconds, so a kill lands
    # while it waits on the engine.
    cfg = RolloutConfig(n=2, max_new_tokens=400, max_model_len=512, engine_process="separate")
    actor = RolloutActor(str(tiny_model_dir), ModelConfig(), GlimpseConfig(prune_layer=2), cfg,
                         seed=0)
    yield actor
    actor.shutdown()


def test_a_death_while_generating_raises_engine_died_and_never_hangs(actor):
    from actors.rollout import EngineDied

    prompts = PromptBatch.from_rows(list(generate_split(SyntheticConfig(num_train=4), "train")))
    assert len(actor.generate(prompts.take([0]), 1, greedy=True).response_ids[0]) > 100
    cores = _engine_cores()
    assert len(cores) == 1
    result: dict = {}

    def call() -> None:
        try:
            result["out"] = actor.generate(prompts, 2)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    killer = threading.Timer(2.0, cores[0].kill)  # mid-call: 8 answers of ~400 tokens
    killer.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "generate still waits on the dead engine"
    assert "out" not in result, "the call finished before the kill: make it longer"
    assert isinstance(result["error"], EngineDied), result["error"]
    # the engine stays dead for the next call, a weight reload included: EngineDied again
    assert not actor.engine_alive()
    with pytest.raises(EngineDied, match="loading weights"):
        actor.load_weights(dict(actor.model.base.state_dict()))


def test_a_death_during_the_weight_push_restarts_that_engine_and_pushes_again():
    """GRPO's Roles.push_weights on its own rule (no actors): the push fails with an engine
    death, the dead engine is restarted (it takes the current weights) and the push repeated;
    any other failure is not retried."""
    from ray.exceptions import RayActorError

    from pipeline.grpo import Roles

    class FlakySync:
        def __init__(self, failures):
            self.failures, self.pushes = list(failures), 0

        def push(self):
            self.pushes += 1
            if self.failures:
                raise self.failures.pop(0)
            return {"weight_sync/version": 1.0}

    roles = Roles.__new__(Roles)  # only the push and restart bookkeeping
    restarted = []
    roles._dead_engines = lambda: [1]
    roles._restart_rollout = lambda i, cause: restarted.append(i)
    roles.weight_sync = FlakySync([RayActorError()])
    assert roles.push_weights() == {"weight_sync/version": 1.0}
    assert restarted == [1] and roles.weight_sync.pushes == 2
    roles.weight_sync = FlakySync([ValueError("a bad tensor name")])
    with pytest.raises(ValueError, match="bad tensor"):
        roles.push_weights()
    assert restarted == [1]
