"""Shared fixtures: the tiny model and a small synthetic data config, built once per session."""

from __future__ import annotations

import pytest

from pipeline.config import load_config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL written by the project's own factory (seed 0)."""
    from glimpseprune.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture()
def small_cfg(tmp_path):
    """configs/tiny.yaml with a few images per split and output under tmp_path."""
    return load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", "data.synthetic.num_train=12",
        "data.synthetic.num_validation=4", "data.synthetic.num_test=4"])


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, and said so, on a machine without it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
