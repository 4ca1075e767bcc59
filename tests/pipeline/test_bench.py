"""pipeline.bench without engines: the grid, the per-size config (and the processor it makes),
the random masks, one measurement's accounting on a stand-in actor / engine, the cells and the
report. The engines themselves run in tests/e2e/test_bench.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from pipeline import bench, bench_report
from pipeline.bench_cost import dims_from_config, predicted_ratios
from pipeline.bench_time import Machine, predicted_time_ratios
from pipeline.config import RolloutConfig, load_config


def test_grid_defaults_are_small_and_bad_values_fail():
    grid = bench.Grid()
    assert len(list(grid.cells())) == 1 and grid.image_sizes == (448,)
    assert bench._split(float)("0.05, 0.1,") == (0.05, 0.1)
    for bad in (dict(keep_ratios=(0.0,)), dict(keep_ratios=(1.5,)), dict(mask_modes=("full",)),
                dict(group_sizes=()), dict(rounds=0)):
        with pytest.raises(ValueError):
            bench.Grid(**bad)


def test_size_config_sets_every_image_size_knob(tiny_model_dir):
    from glimpseprune.processor import load_processor

    cfg = load_config("configs/tiny.yaml", [])
    grid = bench.Grid(new_tokens=(32, 128), prompts=3)
    for px, visual in ((224, 64), (896, 1024)):
        sized = bench.size_config(cfg, px, grid)
        assert sized.model.max_pixels == px * px and sized.model.min_pixels <= px * px
        assert (sized.data.synthetic.image_size, sized.data.synthetic.num_test,
                sized.data.synthetic.questions_per_image) == (px, 3, 1)
        assert sized.rollout.ignore_eos and sized.rollout.temperature == 1.0
        # room for ~text + every visual token + T: 1024 + 128 + 256 at 896 px
        assert sized.rollout.max_model_len == max(1024, visual + 128 + 256)
        # The checkpoint's processor was saved at 448 px: the config's size wins.
        inputs = load_processor(tiny_model_dir, sized.model).image_processor(
            images=[Image.new("RGB", (px, px))], return_tensors="pt")
        assert int(inputs["image_grid_thw"].prod()) // 4 == visual
    with pytest.raises(ValueError, match="multiple of 28"):
        bench.size_config(cfg, 300, grid)


def test_random_masks_shared_and_sampled():
    shared = bench.random_masks(3, 4, 64, 0.1, "shared", seed=0)
    sampled = bench.random_masks(3, 4, 64, 0.1, "sampled", seed=0)
    assert len(shared) == len(sampled) == 12
    assert all(int(m.sum()) == 6 for m in shared + sampled)  # round(0.1 x 64)
    for p in range(3):  # shared: one mask per prompt, repeated over its group
        assert all(torch.equal(shared[4 * p], m) for m in shared[4 * p:4 * p + 4])
    assert not torch.equal(shared[0], shared[4])
    assert len({tuple(m.tolist()) for m in sampled}) == 12  # sampled: one per sample
    assert int(bench.random_masks(1, 1, 64, 0.001, "shared", 0)[0].sum()) == 1  # at least one
    pairs = bench.random_masks(3, 4, 64, 0.1, "sampled:2", seed=0)  # 2 per prompt, 2 samples each
    assert [tuple(m.tolist()) for m in pairs[::2]] == [tuple(m.tolist()) for m in pairs[1::2]]
    assert len({tuple(m.tolist()) for m in pairs}) == 6
    for bad in ("sampled:3", "sampled:0", "grouped"):  # 3 does not divide G = 4
        with pytest.raises(ValueError, match="mask"):
            bench.Grid(group_sizes=(4,), mask_modes=(bad,))


class _FakeLLM:
    def __init__(self):
        self.resets = []
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: self.resets.append("enc"))

    def reset_prefix_cache(self):
        self.resets.append("prefix")

    def reset_mm_cache(self):
        self.resets.append("mm")


class _FakeActor:
    """The RolloutActor's generate contract, with fixed times: 0.5 s pre-pass, 1.5 s vLLM."""

    def __init__(self, short: bool = False):
        self.cfg, self.llm, self.short = RolloutConfig(), _FakeLLM(), short

    def generate(self, prompts, n, keep_masks):
        rows = len(prompts) * n
        tokens = self.cfg.max_new_tokens - (1 if self.short else 0)
        kept = [int(m.sum()) for m in keep_masks]
        return SimpleNamespace(response_ids=[[7] * tokens] * rows, extras={
            "error": [None] * rows, "prepass_s": [0.5] * rows, "generate_s": [1.5] * rows,
            "kept_tokens": kept, "visual_tokens": [64] * rows,
            "prompt_tokens": [20 + k for k in kept]})


def test_pruned_round_pays_for_the_prepass():
    actor, prompts = _FakeActor(), [None, None]  # only len(prompts) is read
    masks = bench.random_masks(2, 4, 64, 0.25, "sampled", 0)
    out = bench.pruned_round(actor, prompts, masks, 4, 8)
    assert actor.cfg.max_new_tokens == 8 and actor.llm.resets == ["prefix", "mm", "enc"]
    # 2 prompts x 4 samples x 8 tokens = 64 tokens over 0.5 + 1.5 s
    assert out["tokens_per_s"] == pytest.approx(32.0) and out["seconds"] == 2.0
    assert (out["kept_tokens"], out["kv_tokens"], out["text_tokens"]) == (16, 36, 20)
    assert out["peak_mem_mb"] > 0
    with pytest.raises(RuntimeError, match="ignore_eos"):
        bench.pruned_round(_FakeActor(short=True), prompts, masks, 4, 8)


def test_stock_round_asks_for_n_samples_of_exactly_t_tokens():
    seen = {}

    class Stock(_FakeLLM):
        def generate(self, requests, params, use_tqdm):
            seen["params"] = params
            completion = SimpleNamespace(token_ids=[1] * params.max_tokens)
            return [SimpleNamespace(outputs=[completion] * params.n, prompt_token_ids=[0] * 84)
                    for _ in requests]

    out = bench.stock_round(Stock(), [{}, {}, {}], 4, 16)
    params = seen["params"]
    assert (params.n, params.max_tokens, params.ignore_eos, params.temperature, params.seed) \
        == (4, 16, True, 1.0, None)
    assert out["kv_tokens"] == 84 and out["tokens_per_s"] == pytest.approx(3 * 4 * 16
                                                                           / out["seconds"])


def test_rollout_actor_ignore_eos_only_when_asked():
    from actors.rollout import RolloutActor

    actor = RolloutActor.__new__(RolloutActor)  # no engine: only the sampling parameters
    actor.cfg = RolloutConfig(max_new_tokens=5)
    assert not actor._sampling_params(greedy=False).ignore_eos
    actor.cfg = RolloutConfig(max_new_tokens=5, ignore_eos=True)
    params = actor._sampling_params(greedy=False)
    assert params.ignore_eos and params.max_tokens == 5 and params.seed is None


def _cells(config: dict):
    grid = bench.Grid(keep_ratios=(0.25,), group_sizes=(4,), new_tokens=(8,),
                      mask_modes=("shared", "sampled"), prompts=2, rounds=1)
    dims = dims_from_config(config, prune_layer=2, vip_hidden=256)
    side = {"tokens_per_s": 100.0, "seconds": 0.64, "kv_tokens": 36.0, "peak_mem_mb": 900.0,
            "kept_tokens": 16.0, "visual_tokens": 64.0, "text_tokens": 20.0,
            "prepass_s": 0.1, "generate_s": 0.54}
    pruned = {(0.25, 4, 8, "shared"): side, (0.25, 4, 8, "sampled"): {**side, "seconds": 1.0,
                                                                       "tokens_per_s": 64.0},
              ("prefill", 0.25): {**side, "seconds": 0.2},
              "prepass_model_mb": {"kept": 3.0, "full": 5.0}}
    stock = {(4, 8): {"tokens_per_s": 80.0, "seconds": 0.8, "kv_tokens": 84.0,
                      "peak_mem_mb": 1000.0},
             "prefill": {"tokens_per_s": 10.0, "seconds": 0.25, "kv_tokens": 84.0,
                         "peak_mem_mb": 1000.0}}
    return bench.build_cells(224, grid, pruned, stock, dims, "test box", MACHINE, 4), dims


MACHINE = Machine(flops_per_s=1e11, bytes_per_s=1e10)


TINY = {"text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 640},
        "vision_config": {"depth": 4, "hidden_size": 128, "intermediate_size": 256,
                          "fullatt_block_indexes": [1, 3], "in_channels": 3, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "window_size": 112}}


def test_cells_hold_both_sides_ratios_and_predictions():
    cells, dims = _cells(TINY)
    shared, sampled = cells
    assert (shared["mask_mode"], sampled["mask_mode"]) == ("shared", "sampled")
    assert shared["ratio"]["tokens_per_s"] == pytest.approx(100 / 80)
    assert sampled["ratio"]["tokens_per_s"] == pytest.approx(64 / 80)
    assert shared["ratio"]["prefill_s"] == pytest.approx(0.2 / 0.25)
    assert shared["ratio"]["kv_tokens"] == pytest.approx(36 / 84)
    assert shared["ratio"]["peak_mem_mb"] == pytest.approx(0.9)
    assert shared["predicted"] == predicted_ratios(dims, 20, 64, 16, 2, 4, 8, "shared")
    assert shared["predicted"]["kv_tokens"] == pytest.approx(36 / 84)  # exact: same counts
    assert shared["roofline"] == predicted_time_ratios(dims, MACHINE, 4, 20, 64, 16, 2, 4, 8,
                                                       "shared")
    assert shared["machine"] == {"flops_per_s": 1e11, "bytes_per_s": 1e10}
    assert sampled["flops"]["pruned"]["prefill"] > shared["flops"]["pruned"]["prefill"]
    assert shared["flops"]["stock"] == sampled["flops"]["stock"]
    assert (shared["visual_tokens"], shared["kept_tokens"], shared["device"]) == \
        (64, 16, "test box")
    assert (shared["pruned"]["prepass_model_mb"], shared["pruned"]["prepass_full_model_mb"]) \
        == (3.0, 5.0)


def test_report_files(tmp_path):
    cells, _ = _cells(TINY)
    paths = bench_report.write(cells, tmp_path / "bench")
    assert json.loads(paths["json"].read_text())[1]["ratio"]["tokens_per_s"] == \
        pytest.approx(0.8)
    text = paths["table"].read_text()
    assert "224px k0.25 G4 T8 shared" in text and "  1.250" in text  # measured ratio
    assert f"{cells[0]['predicted']['tokens_per_s']:7.3f}" in text  # predicted beside it
    assert f"{cells[0]['roofline']['tokens_per_s']:7.3f}" in text  # and the roofline's
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
