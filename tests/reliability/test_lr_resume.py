"""A run resumed with a larger trainer.total_steps continues on the longer schedule from its
first resumed step (not at the finished schedule's LR of 0), and an unchanged schedule resumes
exactly. The policy's scheduler (warm-up + cosine, actors.policy._lr_lambda) on a plain torch
optimiser, saved and loaded as DeepSpeed does (state dicts), then `reapply_schedule` as
PolicyActor.load_checkpoint calls it."""

from __future__ import annotations

import pytest
import torch

from actors.policy import _lr_lambda, reapply_schedule
from pipeline.config import PolicyConfig

BASE_LR = 1e-3


def _trained(total_steps: int, steps: int):
    param = torch.nn.Parameter(torch.zeros(2))
    optimiser = torch.optim.AdamW([param], lr=BASE_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, _lr_lambda(PolicyConfig(lr_schedule="cosine"), total_steps))
    used = []
    for _ in range(steps):
        used.append(optimiser.param_groups[0]["lr"])  # the LR this step trains at
        param.grad = torch.ones(2)
        optimiser.step()
        scheduler.step()
    return param, optimiser, scheduler, used


def _resumed(saved_optimiser, saved_scheduler, total_steps: int):
    param = torch.nn.Parameter(torch.zeros(2))
    optimiser = torch.optim.AdamW([param], lr=BASE_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, _lr_lambda(PolicyConfig(lr_schedule="cosine"), total_steps))
    optimiser.load_state_dict(saved_optimiser.state_dict())
    scheduler.load_state_dict(saved_scheduler.state_dict())
    reapply_schedule(scheduler)
    return optimiser


def test_a_longer_run_resumes_on_the_longer_schedule():
    _, optimiser, scheduler, used = _trained(total_steps=8, steps=8)
    assert used[-1] < 0.05 * BASE_LR  # the end of the cosine
    resumed = _resumed(optimiser, scheduler, total_steps=16)
    longer = _lr_lambda(PolicyConfig(lr_schedule="cosine"), 16)
    assert resumed.param_groups[0]["lr"] == pytest.approx(BASE_LR * longer(8))
    assert resumed.param_groups[0]["lr"] > 0.4 * BASE_LR  # half way down the longer cosine


def test_an_unchanged_schedule_resumes_exactly():
    _, optimiser, scheduler, _ = _trained(total_steps=8, steps=3)
    _, _, _, uninterrupted = _trained(total_steps=8, steps=4)
    resumed = _resumed(optimiser, scheduler, total_steps=8)
    assert resumed.param_groups[0]["lr"] == uninterrupted[3]
