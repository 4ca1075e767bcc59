"""PolicyActor: one rank of the trained model under DeepSpeed ZeRO-3.

Owns the DeepSpeed engine (its config is built here from the `policy` section, not read from a
JSON file), the micro-batching and gradient accumulation of one optimiser step, log-probs of
response tokens on a RolloutBatch, the stage losses that use them, checkpoints (DeepSpeed
shards) and the gathered full weights for HF export and weight sync. Must not read data or talk
to MLflow: the driver sends batches and logs what comes back.

Loss normalisation (why the arithmetic below looks odd): a step's loss is the mean over every
response token of the whole global batch, whatever the number of ranks and micro-batches. Each
rank's micro-batch contributes sum(token losses) * world_size / global_tokens, because DeepSpeed
averages gradients over ranks; so one rank and two ranks compute the same gradient.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from actors.batching import equal_micro_batches, prompt_inputs
from actors.build_locks import stale_lock_watchdog
from actors.group import DistInfo
from pipeline.batch import RolloutBatch
from pipeline.checkpoint import atomic_folder
from pipeline.config import ModelConfig, PolicyConfig
from pipeline.prompts import prompt_text


def _lr_lambda(policy_cfg: PolicyConfig, total_steps: int, restart_at: int = 0):
    """LR factor per step: warm-up then cosine (or constant); with `restart_at` > 0 the steps
    from there on get a warm-up and cosine of their own (a second phase, e.g. SFT's answer
    phase after the dense pretraining, starts at full LR instead of mid-decay)."""

    def phase_factor(step: int, length: int) -> float:
        warmup = max(1, round(policy_cfg.warmup_ratio * length))
        if step < warmup:
            return (step + 1) / warmup
        if policy_cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, length - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if 0 < restart_at < total_steps:
            if step < restart_at:
                return phase_factor(step, restart_at)
            return phase_factor(step - restart_at, total_steps - restart_at)
        return phase_factor(step, total_steps)

    return factor


def reapply_schedule(scheduler) -> None:
    """After a resume: every group's LR from this run's schedule at the restored step.

    The optimiser's saved LR is the old run's, and the scheduler's own step comes after the
    optimiser's: resumed with a larger trainer.total_steps, the first step would still train at
    the old schedule's LR (0 at the end of a finished cosine), the later ones on the longer
    schedule. With an unchanged schedule this sets the LR it already has (exact resume)."""
    if not hasattr(scheduler, "lr_lambdas"):
        return
    lrs = [base * factor(scheduler.last_epoch)
           for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _group_lr_lambdas(policy_cfg: PolicyConfig, total_steps: int, restart_at: int,
                      vision_boost: float) -> list:
    """LR factors of the (language model, vision tower) parameter groups. While the vision
    tower pretrains alone (steps before `restart_at`) its factor is `vision_boost` times the
    other's: a random tower learns per-cell features at a higher rate than the answer phase
    can take (shared docs tiny-task.md: 3e-3 there)."""
    factor = _lr_lambda(policy_cfg, total_steps, restart_at)
    return [factor, lambda step: factor(step) * (vision_boost if step < restart_at else 1.0)]


def deepspeed_config(policy_cfg: PolicyConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config of a policy (or reference) engine."""
    micro = policy_cfg.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": policy_cfg.grad_accum_steps,
        "train_batch_size": micro * policy_cfg.grad_accum_steps * world_size,
        "gradient_clipping": policy_cfg.max_grad_norm,
        "zero_optimization": {"stage": policy_cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": policy_cfg.lr, "weight_decay": policy_cfg.weight_decay,
            "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class PolicyActor:
    """One ZeRO-3 rank. Every public method is called on all ranks together (collectives).

    Args:
        dist: this rank's place in the group.
        policy_cfg: the `policy` config section.
        model_cfg: the `model` config section (dtype, trust_remote_code, image sizes).
        model_path: HF checkpoint folder to start from.
        seed: torch seed (same on every rank).
        total_steps: optimiser steps of the run, for the LR schedule.
        dense_heads: add pipeline.dense's per-cell heads (synthetic data's vision pretraining).
        vision_lr_scale: the vision tower's LR relative to the LR.
        lr: the stage's LR; None takes `policy_cfg.lr`.
        lr_restart_step: > 0: a second warm-up + cosine starts at this step (SFT's answer
            phase after the dense pretraining).
        vision_pretrain_lr: > 0: the vision tower's LR before `lr_restart_step`.
        box_attention: SFT: {"weight": w, "layers": [...], "word_weight": w2,
            "word_layers": [...]} asks the answer positions' attention in those decoder
            layers to fall on the target box / on the question's words naming it
            (actors/answer_attention.py; the language model then runs eager attention).
        glimpse_cfg: stage 1: train only the glimpse token + VIP of a GlimpsePruneModel built
            on the frozen base (a `GlimpseConfig`); None trains the base model itself.
        grpo: stage 2: {"glimpse": GlimpseConfig, "algo": AlgoConfig, "mask_temperature":
            float}: a GlimpsePruneModel (base + the stage-1 modules of glimpse.modules_path)
            trained on replayed keep masks (actors/policy_grpo.py); the glimpse modules train
            only with algo.train_vip.
    """

    def __init__(self, dist: DistInfo, policy_cfg: PolicyConfig, model_cfg: ModelConfig,
                 model_path: str, seed: int, total_steps: int, dense_heads: bool = False,
                 vision_lr_scale: float = 1.0, lr: float | None = None, glimpse_cfg=None,
                 grpo: dict | None = None, lr_restart_step: int = 0,
                 vision_pretrain_lr: float = 0.0, box_attention: dict | None = None):
        import deepspeed
        from transformers import Qwen2_5_VLForConditionalGeneration

        from glimpseprune.processor import load_processor

        torch.manual_seed(seed)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dist.init_torch_distributed()  # its store and sockets on 127.0.0.1 on one node
        with stale_lock_watchdog():  # its JIT op build must not hang on a dead lock
            deepspeed.init_distributed(dist_backend=dist.backend)
        if lr is not None:
            policy_cfg = replace(policy_cfg, lr=lr)
        self.dist, self.cfg, self.glimpse = dist, policy_cfg, glimpse_cfg is not None
        self.glimpse_cfg, self.grpo = glimpse_cfg, grpo
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        bf16 = self.device.type == "cuda" and model_cfg.dtype == "bfloat16"
        self.processor = load_processor(model_path, model_cfg)
        dtype = torch.bfloat16 if bf16 else torch.float32
        if self.glimpse:
            self._init_glimpse(deepspeed, model_path, glimpse_cfg, dtype, seed, total_steps, bf16)
            return
        if grpo is not None:
            self._init_grpo(deepspeed, model_path, dtype, seed, total_steps, bf16)
            return
        on = box_attention and (box_attention.get("weight", 0.0) > 0
                                or box_attention.get("word_weight", 0.0) > 0)
        self.box_attention = box_attention if on else None
        # Attention weights come out of eager attention only; the export's config keeps none of
        # this (inference loads with the default implementation).
        attn = {"attn_implementation": "eager"} if on else {}
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **attn)
        if on:
            from actors.answer_attention import AttentionCapture

            layers = set(box_attention["layers"]) | set(box_attention.get("word_layers", []))
            self.attention = AttentionCapture(model.model.language_model.layers,
                                              sorted(layers))
        if policy_cfg.freeze_vision:
            model.model.visual.requires_grad_(False)
        if policy_cfg.lora.enabled:
            model = self._with_lora(model)
        if policy_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if dense_heads:
            from pipeline.dense import DenseHeads

            model.dense_heads = DenseHeads(model.config.text_config.hidden_size)
        vision_lr = policy_cfg.lr * vision_lr_scale
        groups = [
            {"params": [p for n, p in model.named_parameters()
                        if p.requires_grad and ".visual." not in f".{n}"]},
            {"params": [p for n, p in model.named_parameters()
                        if p.requires_grad and ".visual." in f".{n}"], "lr": vision_lr}]
        factors = _group_lr_lambdas(policy_cfg, total_steps, lr_restart_step,
                                    vision_pretrain_lr / vision_lr
                                    if vision_pretrain_lr and vision_lr else 1.0)
        factors = [f for f, g in zip(factors, groups, strict=True) if g["params"]]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[g for g in groups if g["params"]],
            config=deepspeed_config(policy_cfg, dist.world_size, bf16),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factors))
        # The vision tower's merged output of the latest forward, for the dense auxiliary loss.
        self._visual_out: torch.Tensor | None = None
        self._visual().register_forward_hook(self._keep_visual_output)

    def _init_glimpse(self, deepspeed, model_path, glimpse_cfg, dtype, seed, total_steps, bf16):
        from glimpseprune.model import GlimpsePruneModel

        model = GlimpsePruneModel.from_pretrained(model_path, glimpse_cfg, dtype=dtype,
                                                  seed=seed).stage1()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=list(model.glimpse_modules.parameters()),
            config=deepspeed_config(self.cfg, self.dist.world_size, bf16),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, _lr_lambda(self.cfg, total_steps)))

    def _init_grpo(self, deepspeed, model_path, dtype, seed, total_steps, bf16):
        from glimpseprune.model import GlimpsePruneModel

        model = GlimpsePruneModel.from_pretrained(model_path, self.grpo["glimpse"], dtype=dtype,
                                                  seed=seed)
        if self.cfg.lora.enabled:
            from actors.lora import inject_lora

            inject_lora(model.base, self.cfg.lora)  # only the adapters train
        else:
            model.base.requires_grad_(True)
            if self.cfg.freeze_vision:
                model.base.model.visual.requires_grad_(False)
        model.glimpse_modules.requires_grad_(self.grpo["algo"].train_vip)
        if self.cfg.gradient_checkpointing:
            model.base.gradient_checkpointing_enable()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(self.cfg, self.dist.world_size, bf16),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, _lr_lambda(self.cfg, total_steps)))

    def _visual(self):
        module = self.engine.module
        base = module.get_base_model() if self.cfg.lora.enabled else module
        return base.model.visual

    def _keep_visual_output(self, _module, _inputs, output) -> None:
        self._visual_out = output.pooler_output

    def _with_lora(self, model):
        from peft import LoraConfig, get_peft_model

        lora = self.cfg.lora
        # Only the language model's Linear layers: the regex keeps the vision tower out.
        pattern = r".*language_model.*\.(" + "|".join(lora.target_modules) + ")"
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                lora_dropout=lora.dropout,
                                                target_modules=pattern))

    # ----------------------------------------------------------------- forward
    def _model_inputs(self, batch: RolloutBatch, rows: range) -> tuple[dict, list[range]]:
        """Right-padded prompt + response sequences of `rows`, and each response's positions."""
        pad = self.processor.tokenizer.pad_token_id
        seqs, pixels, grids, spans = [], [], [], []
        for i in rows:
            p = batch.prompt_index_B[i]
            enc = self.processor(text=[prompt_text(self.processor, batch.prompts.questions[p])],
                                 images=[batch.prompts.images[p]], return_tensors="pt")
            prompt_ids = enc["input_ids"][0].tolist()
            spans.append(range(len(prompt_ids), len(prompt_ids) + len(batch.response_ids[i])))
            seqs.append(prompt_ids + list(batch.response_ids[i]))
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        for j, seq in enumerate(seqs):
            input_ids[j, :len(seq)] = torch.tensor(seq)
            attention[j, :len(seq)] = 1
        # mm_token_type_ids (1 on image tokens) is what lets transformers build the M-RoPE
        # (t, h, w) ids; without it Qwen2.5-VL silently falls back to 1-D positions, which is
        # not what generation, the pruned prefill or vLLM use.
        inputs = {"input_ids": input_ids, "attention_mask": attention,
                  "pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids),
                  "mm_token_type_ids": (input_ids == self._image_token_id()).long()}
        # (row order = image order: one image per prompt, rows in `rows` order)
        return {k: v.to(self.device) for k, v in inputs.items()}, spans

    def _image_token_id(self) -> int:
        return self.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def _response_logprobs(self, batch: RolloutBatch, rows: range, with_inputs: bool = False):
        """Log-probs [T_i] of each row's response tokens; with `with_inputs` also the model
        inputs and each response's positions."""
        inputs, spans = self._model_inputs(batch, rows)
        logits = self.engine(**inputs, use_cache=False).logits.float()
        out = []
        for j, span in enumerate(spans):
            targets = inputs["input_ids"][j, span.start:span.stop]
            # position t predicts token t + 1
            logp = torch.log_softmax(logits[j, span.start - 1:span.stop - 1], dim=-1)
            out.append(logp.gather(-1, targets[:, None])[:, 0])
        return (out, inputs, spans) if with_inputs else out

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[list[int], int]]:
        return equal_micro_batches(len(batch), self.cfg.micro_batch_size)

    # ------------------------------------------------------------- public API
    def compute_logprobs(self, batch: RolloutBatch) -> list[list[float]]:
        """Log-probs of every response token of this rank's shard (no gradient); in GRPO mode
        on each row's keep mask (the replay forward)."""
        if self.grpo is not None:
            from actors.policy_grpo import replay_logprobs

            return replay_logprobs(self, batch)
        self.engine.eval()
        with torch.no_grad():
            return [lp.tolist() for mb, real in self._micro_batches(batch)
                    for lp in self._response_logprobs(batch, mb)[:real]]

    def evaluate(self, batch: RolloutBatch) -> list[bool]:
        """Per row: would greedy decoding reproduce the response exactly?

        Greedy decoding emits the reference iff at every position the reference token is the
        argmax along the reference's own prefix, so one teacher-forced pass answers it.
        """
        self.engine.eval()
        hits = []
        with torch.no_grad():
            for mb, real in self._micro_batches(batch):
                inputs, spans = self._model_inputs(batch, mb)
                logits = self.engine(**inputs, use_cache=False).logits
                for j, span in enumerate(spans[:real]):
                    pred = logits[j, span.start - 1:span.stop - 1].argmax(-1)
                    hits.append(bool((pred == inputs["input_ids"][j, span.start:span.stop])
                                     .all()))
        return hits

    def train_step(self, batch: RolloutBatch, loss: str = "sft",
                   dense_weight: float = 0.0) -> dict[str, float]:
        """One optimiser step over this rank's shard, accumulated over micro-batches.

        Args:
            batch: this rank's rows.
            loss: "sft" (negative log-likelihood of the response tokens where
                extras["loss_mask"] is 1, all of them without it; global token mean; plus the
                box-attention term when the actor has one, actors/policy_sft.py), "dense" (the
                vision tower's per-cell loss alone), "glimpse_box", "glimpse_distill",
                "glimpse_box+distill" (stage 1, actors/policy_glimpse.py) or "grpo"
                (actors/policy_grpo.py).
            dense_weight: weight of the per-cell loss added to "sft" (0: none).

        Returns:
            loss (the answer NLL for "sft", the dense loss for "dense"), grad_norm, lr,
            tokens, and the dense heads' accuracies / box-attention figures when they ran.
        """
        if loss in ("glimpse_box", "glimpse_distill", "glimpse_box+distill"):
            from actors.policy_glimpse import glimpse_step

            return glimpse_step(self, batch, loss)
        if loss == "grpo":
            from actors.policy_grpo import grpo_step

            return grpo_step(self, batch)
        if loss not in ("sft", "dense"):
            raise ValueError(f"unknown loss {loss!r}; this engine knows: sft, dense, "
                             "glimpse_box, glimpse_distill, glimpse_box+distill, grpo")
        from actors.policy_sft import sft_step

        return sft_step(self, batch, loss, dense_weight)

    def _prompt_inputs(self, batch: RolloutBatch, rows: range) -> dict:
        return prompt_inputs(self.processor, batch, rows, self.device)

    def export_glimpse(self, folder: str) -> None:
        """Writes the glimpse modules (safetensors + JSON) to `folder` from rank 0. Collective."""
        import deepspeed

        from glimpseprune.io import save_modules

        modules = self.engine.module.glimpse_modules
        with deepspeed.zero.GatheredParameters(list(modules.parameters()), modifier_rank=None):
            if self.dist.rank == 0:
                save_modules(modules, folder)
        torch.distributed.barrier()

    def save_checkpoint(self, folder: str, client_state: dict) -> None:
        """DeepSpeed shards + optimiser + `client_state` (step, data position) into `folder`."""
        self.engine.save_checkpoint(folder, tag="state", client_state=client_state)

    def load_checkpoint(self, folder: str) -> dict:
        """Restores weights, optimiser and scheduler; returns the saved client_state. Every
        file is read with torch.load(weights_only=True) (actors/safe_checkpoint.py)."""
        from actors.safe_checkpoint import weights_only_loads

        with weights_only_loads(self.engine):
            path, client_state = self.engine.load_checkpoint(folder, tag="state")
        if path is None or client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}/state")
        if self.engine.lr_scheduler is not None:
            reapply_schedule(self.engine.lr_scheduler)
        return client_state

    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None elsewhere) under the module's own parameter names (with
        LoRA: the peft names, adapters separate, not merged). Collective."""
        import deepspeed

        module = self.engine.module
        state = {}
        for name, param in module.named_parameters():
            if name.startswith("dense_heads."):
                continue  # a training aid, not part of the model
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.dist.rank == 0:
                    state[name] = param.detach().to("cpu", copy=True)
        return state if self.dist.rank == 0 else None

    def _gathered_buckets(self, bucket_numel: int):
        """What weight sync sends: the parameters training changes (frozen ones, e.g. the
        vision tower and, without algo.train_vip, the glimpse modules, never change), gathered
        in buckets of about `bucket_numel` elements (full sizes: `ds_numel` under ZeRO-3).
        Collective: every rank iterates; rank 0 gets each bucket as a {name: CPU tensor} dict
        while its parameters are gathered, the others None."""
        import deepspeed

        from actors.lora import layer_params, lora_layers, merged_weight

        module = self.engine.module
        # (name to send, parameters to gather, how to make the tensor): LoRA layers go merged
        # under the base's own names; other trainable parameters go as they are.
        items = [(f"{n}.weight", layer_params(m), lambda m=m: merged_weight(m))
                 for n, m in lora_layers(module)] if self.cfg.lora.enabled else []
        # vLLM loads q/k/v (and gate/up) as one packed layer and rebuilds it whole: an adapted
        # layer's bias goes too, or the reload would leave the packed bias uninitialised.
        items += [(f"{n}.bias", [m.base_layer.bias],
                   lambda m=m: m.base_layer.bias.detach().to("cpu", copy=True))
                  for n, m in (lora_layers(module) if self.cfg.lora.enabled else [])
                  if m.base_layer.bias is not None]
        items += [(n, [p], lambda p=p: p.detach().to("cpu", copy=True))
                  for n, p in module.named_parameters()
                  if p.requires_grad and ".lora_" not in n and not n.startswith("dense_heads.")]
        buckets, current, size = [], [], 0
        for item in items:
            current.append(item)
            size += sum(getattr(p, "ds_numel", p.numel()) for p in item[1])
            if size >= bucket_numel:
                buckets.append(current)
                current, size = [], 0
        buckets += [current] if current else []
        for bucket in buckets:
            params = [p for _, group, _ in bucket for p in group]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield {name: make() for name, _, make in bucket} if self.dist.rank == 0 \
                    else None

    def trainable_buckets(self, bucket_numel: int) -> list:
        """Weight sync through Ray's object store (rollout.weight_sync=object_store): the
        buckets of `_gathered_buckets`, each put in the object store by rank 0. Collective.

        Returns:
            on rank 0, one ObjectRef per bucket (a {name: CPU tensor} dict); [] elsewhere.
        """
        import ray

        return [ray.put(bucket) for bucket in self._gathered_buckets(bucket_numel)
                if bucket is not None]

    def open_weight_channel(self, host: str, world_size: int, timeout_s: float) -> int:
        """Rank 0: opens the weight-sync group's store on `host`; returns its port."""
        from actors.group import tcp_store

        self._channel_store, port = tcp_store(host, 0, world_size, True, timeout_s)
        self._channel_args = (host, port, world_size, timeout_s)
        return port

    def join_weight_channel(self, device_host: str) -> None:
        """Rank 0: joins the group as its sender (blocks until every engine has joined)."""
        from actors.weight_channel import WeightChannel

        host, port, world_size, timeout_s = self._channel_args
        self.weight_channel = WeightChannel(host, port, 0, world_size, timeout_s,
                                            store=self._channel_store, device_host=device_host)

    def send_weight_buckets(self, bucket_numel: int) -> tuple[int, int]:
        """Weight sync through the collective (rollout.weight_sync=collective): every rank
        gathers, rank 0 broadcasts each bucket to the engines, then the end of the push.
        Collective. Returns the bytes and buckets rank 0 sent ((0, 0) elsewhere)."""
        channel = getattr(self, "weight_channel", None)
        if self.dist.rank == 0 and channel is None:
            raise RuntimeError("send_weight_buckets before join_weight_channel")
        before, buckets = (channel.bytes_sent if channel is not None else 0), 0
        for bucket in self._gathered_buckets(bucket_numel):
            if bucket is not None:
                channel.send_bucket(bucket)
                buckets += 1
        if self.dist.rank != 0:
            return 0, 0
        channel.end_push()
        return channel.bytes_sent - before, buckets

    def node_address(self) -> str:
        """The IP address of the node this rank runs on (for the weight-sync group)."""
        import ray

        return ray.util.get_node_ip_address()

    @staticmethod
    def _save_merged_lora(module, folder: str) -> None:
        # Merge, save under the base model's own names, unmerge: training goes on unchanged.
        module.merge_adapter()
        base = module.get_base_model()
        state = {name.replace(".base_layer", ""): tensor
                 for name, tensor in base.state_dict().items() if ".lora_" not in name}
        base.save_pretrained(folder, state_dict=state, safe_serialization=True)
        module.unmerge_adapter()

    def export_hf(self, folder: str) -> None:
        """Writes an HF-format checkpoint (safetensors + processor) to `folder` from rank 0; in
        GRPO mode with the glimpse modules in `folder/glimpse_modules`."""
        import deepspeed

        from glimpseprune.io import save_modules

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.dist.rank == 0:
                with atomic_folder(folder) as tmp:
                    if self.grpo is not None:
                        from actors.lora import merged_state_dict

                        state = merged_state_dict(module.base) if self.cfg.lora.enabled else None
                        module.base.save_pretrained(tmp, state_dict=state,
                                                    safe_serialization=True)
                        save_modules(module.glimpse_modules, tmp / "glimpse_modules")
                    elif self.cfg.lora.enabled:
                        self._save_merged_lora(module, str(tmp))
                    else:
                        state = {k: v for k, v in module.state_dict().items()
                                 if not k.startswith("dense_heads.")}
                        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                    self.processor.save_pretrained(tmp)
        torch.distributed.barrier()
