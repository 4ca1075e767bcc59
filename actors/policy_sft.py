"""The warm start's update of one policy rank: answer NLL, dense per-cell loss, attention terms.

Owns the per-micro-batch arithmetic of `PolicyActor.train_step(batch, "sft" | "dense")`: the
answers-only negative log-likelihood (global token mean, see actors/policy.py on
normalisation), the dense per-cell loss of the vision tower (pipeline.dense; synthetic data
only) and the box- and word-attention terms (actors/answer_attention.py). Must not build the engine
(actors/policy.py does) nor talk to Ray or MLflow.
"""

from __future__ import annotations

import torch

from actors.batching import all_reduce_
from pipeline.batch import RolloutBatch


def _dense_loss(actor, batch: RolloutBatch, rows: list[int], real: int, grids: torch.Tensor,
                feats_VD: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed per-image dense loss of the first `real` of `rows` (their images in order; the
    heads run on every row, see equal_micro_batches) and head accuracies."""
    from pipeline.dense import cell_labels

    sizes = (grids.prod(-1) // 4).tolist()
    losses, accs = [], []
    for i, feats, grid in zip(rows, torch.split(feats_VD, sizes), grids, strict=True):
        p = batch.prompt_index_B[i]
        image = batch.prompts.images[p]
        labels = cell_labels(batch.prompts.objects[p], (image.height, image.width),
                             (int(grid[1]) // 2, int(grid[2]) // 2))
        loss, acc = actor.engine.module.dense_heads(feats, labels)
        losses.append(loss)
        accs.append(acc)
    accs = accs[:max(real, 1)]
    mean_acc = {f"dense_acc_{k}": sum(a.get(k, 0.0) for a in accs) / len(accs)
                for k in ("kind", "color", "digit")}
    return torch.stack(losses[:real] or [losses[0] * 0.0]).sum(), mean_acc


def _attention_queries(batch: RolloutBatch, rows: list[int], spans: list[range]) -> list:
    """Per row: (sequence position predicting an answer's first token, its target boxes, the
    ids of its question's words naming the target)."""
    answer_boxes = batch.extras.get("answer_boxes") or [[] for _ in range(len(batch))]
    return [[(span.start + offset - 1, boxes, words) for offset, boxes, words in answer_boxes[i]]
            for i, span in zip(rows, spans, strict=True)]


def _attention_terms(actor, batch: RolloutBatch, rows: list[int], inputs: dict,
                     spans: list[range]) -> tuple[torch.Tensor, torch.Tensor]:
    """(box term + word term, each weighted and summed over answers; [4] sums for the
    metrics: box loss, box mass, word loss, word mass)."""
    from actors.answer_attention import box_attention_loss, word_attention_loss

    spec, weights = actor.box_attention, actor.attention.weights
    queries = _attention_queries(batch, rows, spans)
    images = [batch.prompts.images[batch.prompt_index_B[i]] for i in rows]
    box, _, box_mass = box_attention_loss(
        weights, spec["layers"], inputs["input_ids"], actor._image_token_id(), queries,
        inputs["image_grid_thw"], [(im.height, im.width) for im in images])
    objective = spec["weight"] * box
    word, word_mass = box * 0.0, 0.0
    if spec.get("word_weight", 0.0) > 0:
        word, _, word_mass = word_attention_loss(weights, spec["word_layers"],
                                                 inputs["input_ids"], queries)
        objective = objective + spec["word_weight"] * word
    sums = torch.tensor([float(box.detach()), box_mass, float(word.detach()), word_mass])
    return objective, sums


def sft_step(actor, batch: RolloutBatch, loss: str, dense_weight: float) -> dict[str, float]:
    """One optimiser step of "sft" (answer NLL where extras["loss_mask"] is 1, plus
    `dense_weight` x the dense loss and the actor's weighted attention terms) or
    "dense" (the dense loss alone; the whole model still runs forward through the engine,
    which ZeRO-3's gradient accumulation relies on)."""
    actor.engine.train()
    attention_on = loss == "sft" and actor.box_attention is not None
    masks = batch.extras.get("loss_mask") or [[1] * len(r) for r in batch.response_ids]
    answer_boxes = batch.extras.get("answer_boxes") or [[] for _ in range(len(batch))]
    supervised = sum(1 for row in answer_boxes for _, boxes, _ in row if boxes)
    counts = torch.tensor([float(sum(map(sum, masks))), float(len(batch)), float(supervised)])
    all_reduce_(counts)  # global response tokens, rows and box-supervised answers
    global_tokens, global_rows, global_answers = counts.tolist()
    # answer NLL, dense loss, box-attention loss, box mass, word-attention loss, word mass
    totals = torch.zeros(6)
    dense_acc: dict[str, float] = {}
    micro = actor._micro_batches(batch)
    for k, (rows, real) in enumerate(micro):
        actor.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
        logprobs, inputs, spans = actor._response_logprobs(batch, rows, with_inputs=True)
        # Only answer tokens count: a packed multi-turn response masks the question turns.
        # Padding rows (after `real`) ran forward for the collectives and count nothing.
        token_sum = -sum((lp * torch.tensor(masks[i], dtype=lp.dtype, device=lp.device)).sum()
                         for i, lp in zip(rows[:real], logprobs[:real], strict=True))
        token_sum = token_sum + 0.0 * logprobs[0].sum()  # a tensor even when real == 0
        objective = token_sum / global_tokens if loss == "sft" else token_sum * 0.0
        totals[0] += token_sum.detach().cpu()
        if loss == "dense" or dense_weight > 0:
            # The vision tower's merged output of the forward just run (forward hook).
            dense_sum, accs = _dense_loss(actor, batch, rows, real, inputs["image_grid_thw"],
                                          actor._visual_out)
            scale = 1.0 if loss == "dense" else dense_weight
            objective = objective + scale * dense_sum / global_rows
            totals[1] += dense_sum.detach().cpu()
            dense_acc = accs if real else dense_acc
        if attention_on and global_answers > 0:
            term, sums = _attention_terms(actor, batch, rows[:real], inputs, spans[:real])
            objective = objective + term / global_answers
            totals[2:] += sums
        # DeepSpeed averages gradients over ranks: scale back up to the global mean.
        actor.engine.backward(objective * actor.dist.world_size, scale_wrt_gas=False)
    lr = actor.scheduler.get_last_lr()[0]
    actor.engine.step()
    all_reduce_(totals)
    grad_norm = actor.engine.get_global_grad_norm()
    main = totals[0] / global_tokens if loss == "sft" else totals[1] / global_rows
    record = {"loss": float(main), "dense_loss": float(totals[1] / global_rows),
              "lr": float(lr), "tokens": global_tokens, **dense_acc,
              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
    if attention_on:
        names = ("box_attention_loss", "box_attention_mass", "word_attention_loss",
                 "word_attention_mass")
        record.update({name: float(value / max(global_answers, 1))
                       for name, value in zip(names, totals[2:], strict=True)})
    return record
