"""The GlimpsePrune wrapper around a transformers Qwen2.5-VL: glimpse pre-pass, exact pruned
prefill, generation on the kept tokens, and the replay forward used for log-probs.

Owns the two-phase forward of method.md ("Prefill with pruning (exact form)"): decoder layers
0..K over every token plus the glimpse token, VIP logits from the glimpse query's attention at
layer K and the ViT features, the keep mask, a gather of layers 0..K's cache onto the kept tokens
(nothing recomputed), layers K+1.. and the whole decode on the kept tokens only. Kept tokens keep
their ORIGINAL M-RoPE ids; decoding continues at the original last position + 1. Callers that
need the VIP logits only (stage 1, the rollout's pre-pass, GRPO's VIP term) take a shorter pass:
layers 0..K-1 whole and of layer K only its keys, which is all the glimpse query reads.
Must not hold state between calls (no rope_deltas on the model: positions are passed in), must
not patch transformers, and must not train: stage drivers own optimisers and losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from glimpseprune import decoder
from glimpseprune.keep import keep_masks_for_batch
from glimpseprune.layout import PromptLayout, PromptVision, build_layout
from glimpseprune.modules import GlimpseModules, ModulesSpec
from glimpseprune.replay import replay_logprobs


@dataclass
class PrefillState:
    """A batch after the pruned prefill, ready to decode. B rows, N compacted prompt length."""

    cache: DynamicCache  # every layer holds exactly the N kept prompt tokens (no glimpse)
    attention_mask_BN: torch.Tensor  # bool, False on the new left padding
    position_ids_3BN: torch.Tensor  # the kept tokens' original (t, h, w) ids
    token_index_BN: torch.Tensor  # which original prompt position each slot holds
    next_position_B: torch.Tensor  # original last position + 1: where decoding continues
    logits_BNV: torch.Tensor  # LM logits of every slot (or only the last, see prefill)
    vip_logits: list[torch.Tensor]  # per row, [V_b]
    keep_masks: list[torch.Tensor]  # per row, bool [V_b]

    @property
    def num_visual(self) -> list[int]:
        return [int(m.numel()) for m in self.keep_masks]

    @property
    def num_kept(self) -> list[int]:
        return [int(m.sum()) for m in self.keep_masks]


@dataclass
class GenerationOutput:
    """Generated tokens (each row cut after its end-of-turn token) and what was kept."""

    tokens: list[list[int]]
    keep_masks: list[torch.Tensor]
    vip_logits: list[torch.Tensor]
    num_visual: list[int]
    num_kept: list[int]
    step_logits: list[torch.Tensor] = field(default_factory=list)  # per step, [B, vocab]


def default_prune_layer(num_layers: int) -> int:
    """About 2/3 of the depth: floor(2L/3) (7B: 18 of 28, 32B: 42 of 64, tiny: 2 of 4)."""
    return max(0, min(num_layers - 1, (2 * num_layers) // 3))


def spec_for(base_config, glimpse_cfg) -> ModulesSpec:
    """The module sizes for a base model config and a `GlimpseConfig`."""
    text, vision = base_config.text_config, base_config.vision_config
    blocks = list(glimpse_cfg.vit_layers) or list(vision.fullatt_block_indexes)
    prune_layer = glimpse_cfg.prune_layer
    return ModulesSpec(
        text_hidden_size=text.hidden_size, text_layers=text.num_hidden_layers,
        text_heads=text.num_attention_heads, vision_hidden_size=vision.hidden_size,
        vit_layers=sorted(blocks, reverse=True), rms_norm_eps=text.rms_norm_eps,
        prune_layer=default_prune_layer(text.num_hidden_layers) if prune_layer is None
        else prune_layer, vip_hidden_size=glimpse_cfg.vip_hidden_size)


def _check_fits(saved: ModulesSpec, wanted: ModulesSpec, glimpse_cfg) -> None:
    """Saved modules must match the base's sizes, and the config's prune_layer when it sets one."""
    keys = ["text_hidden_size", "text_layers", "text_heads", "vision_hidden_size"]
    if glimpse_cfg.prune_layer is not None:
        keys.append("prune_layer")
    diff = {k: (getattr(saved, k), getattr(wanted, k)) for k in keys
            if getattr(saved, k) != getattr(wanted, k)}
    if diff:
        raise ValueError(f"saved glimpse modules do not fit this model: (saved, wanted) {diff}")


class GlimpsePruneModel(nn.Module):
    """A Qwen2.5-VL (`base`) plus its glimpse modules (`modules`) and the keep rule settings."""

    def __init__(self, base, modules: GlimpseModules, threshold: float = 0.5, min_keep: int = 1,
                 max_keep_ratio: float | None = None):
        super().__init__()
        self.base = base
        self.glimpse_modules = modules
        self.threshold, self.min_keep, self.max_keep_ratio = threshold, min_keep, max_keep_ratio

    @classmethod
    def from_pretrained(cls, model_path, glimpse_cfg=None, modules_path: str | None = None,
                        dtype: torch.dtype = torch.float32, seed: int = 0):
        """Loads the base checkpoint and the glimpse modules (or fresh ones, seeded).

        Args:
            model_path: HF Qwen2.5-VL folder.
            glimpse_cfg: a `pipeline.config.GlimpseConfig`; defaults if None.
            modules_path: folder written by `glimpseprune.io.save_modules`; None: untrained.
            dtype: dtype of base and modules.
            seed: initialisation seed of untrained modules.
        """
        from transformers import Qwen2_5_VLForConditionalGeneration

        from glimpseprune.io import load_modules
        from pipeline.config import GlimpseConfig

        glimpse_cfg = glimpse_cfg or GlimpseConfig()
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa").eval()
        modules_path = modules_path or glimpse_cfg.modules_path or None
        if modules_path:
            modules = load_modules(modules_path)
            _check_fits(modules.spec, spec_for(base.config, glimpse_cfg), glimpse_cfg)
        else:
            with torch.random.fork_rng(devices=[]):  # seed the init, not the caller's RNG
                torch.manual_seed(seed)
                modules = GlimpseModules(spec_for(base.config, glimpse_cfg))
        return cls(base, modules.to(dtype).eval(), glimpse_cfg.threshold, glimpse_cfg.min_keep,
                   glimpse_cfg.max_keep_ratio)

    def forward(self, response_ids: list[list[int]] | None = None, keep_masks: list | None = None,
                with_vip: bool = False, entropies: list | None = None,
                prompt_rows: list[int] | None = None, vision: list | None = None, **inputs):
        """The training forward a DeepSpeed engine calls (one call per micro-batch).

        Without `response_ids` (stage 1): per row, [V_b] VIP logits. With them (stage 2): the
        replay log-probs of the responses on their keep masks (`replay_logprobs`; per-token
        entropies appended to `entropies` when it is a list), and the VIP logits too when
        `with_vip` (GRPO's mask log-likelihood term), else None. With `prompt_rows` (per
        response row, its prompt's row in `inputs`) `inputs` holds each distinct prompt once:
        the G samples of a prompt share its vision-tower and glimpse passes, and its VIP
        logits are one tensor, so the gradients of all its samples add up in one graph. With
        `vision` (per row of `inputs`, a `PromptVision` from the rollout pre-pass of this same
        frozen vision tower) the tower does not run at all.
        """
        if response_ids is None:
            return self.vip_logits(inputs)
        if not with_vip:
            layout = None if vision is None else build_layout(self.base, inputs, None, vision)
            return replay_logprobs(self.base, inputs, keep_masks, response_ids, entropies,
                                   prompt_rows, layout), None
        # One vision-tower pass (with the ViT features the VIP reads) for both halves.
        layout = build_layout(self.base, inputs, self.glimpse_modules.spec.vit_layers, vision)
        logprobs = replay_logprobs(self.base, inputs, keep_masks, response_ids, entropies,
                                   prompt_rows, layout)
        per_prompt = self._vip_pass(inputs, layout)[-1]
        rows = range(len(per_prompt)) if prompt_rows is None else prompt_rows
        return logprobs, [per_prompt[j] for j in rows]

    def stage1(self) -> GlimpsePruneModel:
        """Freezes the base (eval, no grads) and makes only glimpse + VIP trainable."""
        self.base.requires_grad_(False).eval()
        self.glimpse_modules.requires_grad_(True).train()
        return self

    def _glimpse_inputs(self, inputs: dict, layout: PromptLayout | None):
        """The layout, glimpse vectors, the prompt + glimpse token's embeddings, positions,
        attention mask, rotary tables and causal mask that the glimpse pass runs on."""
        spec, text = self.glimpse_modules.spec, decoder.text_model(self.base)
        if layout is None:
            layout = build_layout(self.base, inputs, spec.vit_layers)
        glimpse_LD = self.glimpse_modules.glimpse_token().to(layout.embeds_BPD.dtype)
        batch, _, hidden_size = layout.embeds_BPD.shape
        hidden_BLD = torch.cat([layout.embeds_BPD, glimpse_LD[0].expand(batch, 1, hidden_size)], 1)
        padded_3BP = layout.position_ids_3BP.masked_fill(~layout.attention_mask_BP[None], -1)
        last_B = padded_3BP.amax(dim=(0, 2))
        # The glimpse token sits after the generation prompt at last + 1 on all three axes.
        positions_3BL = torch.cat([layout.position_ids_3BP,
                                   (last_B + 1).view(1, batch, 1).expand(3, batch, 1)], 2)
        attention_BL = torch.cat([layout.attention_mask_BP,
                                  layout.attention_mask_BP.new_ones(batch, 1)], 1)
        rope = decoder.rotary(text, hidden_BLD, positions_3BL)
        mask = decoder.causal_mask(text, hidden_BLD, attention_BL)
        return layout, glimpse_LD, hidden_BLD, positions_3BL, attention_BL, rope, mask

    def _glimpse_pass(self, inputs: dict, layout: PromptLayout | None = None):
        """Layers 0..K over every token + the glimpse token, then the VIP (on `layout` when
        given: it must carry the VIP's ViT features).

        Returns (layout, cache, hidden after layer K [B, P+1, D], positions [3, B, P+1],
        attention mask [B, P+1], vip_logits per row).
        """
        spec, text = self.glimpse_modules.spec, decoder.text_model(self.base)
        layout, glimpse_LD, hidden_BLD, positions_3BL, attention_BL, rope, mask = \
            self._glimpse_inputs(inputs, layout)
        cache = DynamicCache(config=text.config)
        for i in range(spec.prune_layer + 1):
            if i > 0:  # this layer's glimpse vector joins the residual stream at its position
                hidden_BLD = torch.cat([hidden_BLD[:, :-1], hidden_BLD[:, -1:] + glimpse_LD[i]], 1)
            glimpse_in_B1D = hidden_BLD[:, -1:]
            hidden_BLD = decoder.run_layers(text, hidden_BLD, range(i, i + 1), mask, rope, cache)
        vip_logits = self._vip_logits(layout, text.layers[spec.prune_layer], glimpse_in_B1D, rope,
                                      cache.layers[spec.prune_layer].keys)
        return layout, cache, hidden_BLD, positions_3BL, attention_BL, vip_logits

    def _vip_pass(self, inputs: dict, layout: PromptLayout | None = None):
        """`_glimpse_pass` for callers that need the VIP logits only: layers 0..K-1 run whole
        and without a cache, and of layer K only its keys (the glimpse query's logits read
        nothing else of it), so its attention and MLP over every token are skipped. The same
        logits as `_glimpse_pass`, op for op. Returns (layout, vip_logits per row)."""
        spec, text = self.glimpse_modules.spec, decoder.text_model(self.base)
        layout, glimpse_LD, hidden_BLD, _, _, rope, mask = self._glimpse_inputs(inputs, layout)
        for i in range(spec.prune_layer + 1):
            if i > 0:
                hidden_BLD = torch.cat([hidden_BLD[:, :-1], hidden_BLD[:, -1:] + glimpse_LD[i]], 1)
            if i < spec.prune_layer:
                hidden_BLD = decoder.run_layers(text, hidden_BLD, range(i, i + 1), mask, rope,
                                                None)
        layer = text.layers[spec.prune_layer]
        keys_BhLE = decoder.layer_keys(layer, hidden_BLD, rope)
        return layout, self._vip_logits(layout, layer, hidden_BLD[:, -1:], rope, keys_BhLE)

    def _vip_logits(self, layout: PromptLayout, layer, glimpse_in_B1D, rope, keys_BhLE) -> list:
        """Per row, the VIP over the glimpse query's attention logits at layer K."""
        logits_BHL = decoder.glimpse_attention_logits(
            layer, glimpse_in_B1D, (rope[0][:, -1:], rope[1][:, -1:]), keys_BhLE)
        return [self._vip_row(layout, b, logits_BHL[b]) for b in range(len(logits_BHL))]

    def _vip_row(self, layout: PromptLayout, row: int, logits_HL: torch.Tensor) -> torch.Tensor:
        index_V = layout.visual_index[row]
        if index_V.numel() == 0:
            return logits_HL.new_zeros(0)
        return self.glimpse_modules.vip(
            logits_HL[:, index_V].T, layout.vit_features[row], layout.rows[row],
            layout.cols[row], layout.image_ids[row])

    def vip_logits(self, inputs: dict) -> list[torch.Tensor]:
        """Per row, [V_b] VIP logits (differentiable w.r.t. the glimpse modules; stage 1)."""
        return self._vip_pass(inputs)[-1]

    def vip_logits_and_vision(self, inputs: dict) -> tuple[list, list[PromptVision]]:
        """Per row, [V_b] VIP logits and its `PromptVision`: the [V_b, D] merged image
        embeddings (what the LLM receives; a vLLM request of kept tokens carries these) and the
        VIP's pooled ViT features, from ONE pass: the vision tower runs once, not once for the
        VIP and again for the embeddings."""
        layout, vip_logits = self._vip_pass(inputs)
        vision = [PromptVision(layout.embeds_BPD[b, layout.visual_index[b]],
                               list(layout.vit_features[b])) for b in range(len(vip_logits))]
        return vip_logits, vision

    def keep_masks(self, vip_logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """The keep rule with this model's threshold / min_keep / max_keep_ratio."""
        return keep_masks_for_batch(vip_logits, self.threshold, self.min_keep,
                                    self.max_keep_ratio)

    def prefill(self, inputs: dict, keep_masks: list | None = None,
                all_logits: bool = False) -> PrefillState:
        """The exact pruned prefill.

        Args:
            inputs: a left-padded processor batch with images.
            keep_masks: per row, a bool [V_b] mask (or None: keep all) replacing the keep rule;
                None: the keep rule on the VIP logits decides.
            all_logits: return logits of every kept prompt slot, not only the last.
        """
        layout, cache, hidden_BLD, positions_3BL, attention_BL, vip_logits = \
            self._glimpse_pass(inputs)
        if keep_masks is None:
            keep_masks = self.keep_masks(vip_logits)
        keep_masks = [torch.ones(n, dtype=torch.bool, device=hidden_BLD.device) if m is None
                      else torch.as_tensor(m, dtype=torch.bool, device=hidden_BLD.device)
                      for m, n in zip(keep_masks, layout.num_visual, strict=True)]
        keep_BL = attention_BL.clone()
        keep_BL[:, -1] = False  # the glimpse token's entries go: nothing after it may see it
        for b, mask_V in enumerate(keep_masks):
            if mask_V.numel() != layout.num_visual[b]:
                raise ValueError(f"row {b}: keep mask has {mask_V.numel()} entries for "
                                 f"{layout.num_visual[b]} visual tokens")
            keep_BL[b, layout.visual_index[b][~mask_V]] = False
        index_BN, valid_BN = decoder.compact_index(keep_BL)
        text, spec = decoder.text_model(self.base), self.glimpse_modules.spec
        decoder.compact_cache(cache, range(spec.prune_layer + 1), index_BN)
        hidden_BND = decoder.gather_tokens(hidden_BLD, index_BN)
        positions_3BN = decoder.gather_tokens(positions_3BL.permute(1, 2, 0), index_BN)
        positions_3BN = positions_3BN.permute(2, 0, 1)
        hidden_BND = decoder.run_layers(
            text, hidden_BND, range(spec.prune_layer + 1, spec.text_layers),
            decoder.causal_mask(text, hidden_BND, valid_BN),
            decoder.rotary(text, hidden_BND, positions_3BN), cache)
        logits = decoder.lm_logits(self.base, hidden_BND if all_logits else hidden_BND[:, -1:])
        return PrefillState(cache, valid_BN, positions_3BN, index_BN,
                            positions_3BL[0, :, -1].clone(), logits, vip_logits, keep_masks)

    @torch.no_grad()
    def generate(self, inputs: dict, max_new_tokens: int = 32, keep_masks: list | None = None,
                 do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> GenerationOutput:
        """Pruned prefill, then decoding on the kept tokens (greedy unless `do_sample`).

        Args:
            inputs: a left-padded processor batch with images.
            max_new_tokens: most tokens per row; a row stops after its end-of-turn token.
            keep_masks: as in `prefill`; None applies the keep rule.
            do_sample, temperature, generator: sampling from softmax(logits / temperature).
        """
        state = self.prefill(inputs, keep_masks)
        text = decoder.text_model(self.base)
        eos = self.base.generation_config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])
        logits_BV = state.logits_BNV[:, -1]
        attention_BN, tokens, step_logits = state.attention_mask_BN, [], []
        finished_B = torch.zeros(logits_BV.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            step_logits.append(logits_BV.float())
            if do_sample:
                probs = torch.softmax(logits_BV.float() / temperature, -1)
                next_B = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_B = logits_BV.argmax(-1)
            tokens.append(torch.where(finished_B, -1, next_B.cpu()))
            finished_B |= torch.isin(next_B.cpu(), eos_ids)
            if bool(finished_B.all()) or step == max_new_tokens - 1:
                break
            embeds_B1D = self.base.model.get_input_embeddings()(next_B[:, None])
            attention_BN = torch.cat([attention_BN, attention_BN.new_ones(len(next_B), 1)], 1)
            positions_3B1 = (state.next_position_B + step).view(1, -1, 1).expand(3, -1, 1)
            hidden = decoder.run_layers(
                text, embeds_B1D, range(len(text.layers)),
                decoder.causal_mask(text, embeds_B1D, attention_BN, state.cache),
                decoder.rotary(text, embeds_B1D, positions_3B1), state.cache)
            logits_BV = decoder.lm_logits(self.base, hidden)[:, -1]
        rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in state.keep_masks]
        return GenerationOutput([[t for t in row if t >= 0] for row in rows], state.keep_masks,
                                state.vip_logits, state.num_visual, state.num_kept, step_logits)

    def replay_logprobs(self, inputs: dict, keep_masks: list, response_ids: list[list[int]]):
        """Log-probs of responses on the pruned prompts, every layer on the pruned sequence.

        See `glimpseprune.replay.replay_logprobs`; differentiable w.r.t. the base model.
        """
        return replay_logprobs(self.base, inputs, keep_masks, response_ids)
