"""Configuration: plain dataclasses, parsed from Megatron-LM's flag names.

Every field becomes ``--field-name`` (underscores to dashes), so the flags are Megatron-LM's where
Megatron has the option. Booleans are switches. ``--model-preset`` fills the model shape; explicit
model flags override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field

from megatron_tst.models import PRESETS, GPTArchitecture, preset, transformer_engine_available
from megatron_tst.tst import MODES, WEIGHTINGS, TSTPlan


def _help(text, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelOptions:
    model_preset: str | None = _help(f"named shape: {', '.join(PRESETS)}", default=None)
    num_layers: int | None = _help("transformer layers", default=None)
    hidden_size: int | None = _help("hidden size", default=None)
    ffn_hidden_size: int | None = _help("SwiGLU inner size", default=None)
    num_attention_heads: int | None = _help("attention heads", default=None)
    num_query_groups: int | None = _help("key/value heads (grouped-query attention)", default=None)
    kv_channels: int | None = _help("head dimension", default=None)
    vocab_size: int | None = _help("vocabulary size (default: the tokenizer's)", default=None)
    seq_length: int = _help("latent positions per sample (the model's sequence length)", default=1024)
    max_position_embeddings: int | None = _help("defaults to --seq-length", default=None)
    rotary_base: int | None = _help("RoPE base", default=None)
    norm_epsilon: float | None = _help("RMSNorm epsilon", default=None)
    untie_embeddings_and_output_weights: bool = _help("separate input embedding and output head "
                                                      "(the paper's models; presets are untied)", default=False)
    normalization: str = _help("only RMSNorm is supported", default="RMSNorm")
    swiglu: bool = _help("SwiGLU MLP (always on; accepted for Megatron compatibility)", default=False)
    position_embedding_type: str = _help("only rope is supported", default="rope")
    num_experts: int | None = _help("MoE experts per layer", default=None)
    moe_router_topk: int | None = _help("experts per token", default=None)
    moe_ffn_hidden_size: int | None = _help("expert inner size", default=None)
    moe_aux_loss_coeff: float | None = _help("load-balancing loss weight", default=None)
    moe_token_dispatcher_type: str = _help("alltoall or allgather", default="alltoall")
    qk_layernorm: bool = _help("RMSNorm on queries and keys (Qwen3)", default=False)
    init_method_std: float | None = _help("weight init standard deviation", default=None)
    transformer_impl: str | None = _help("local or transformer_engine (default: TE when usable)", default=None)
    fp8_format: str | None = _help("e4m3 or hybrid (Transformer Engine)", default=None)
    fp8_recipe: str = _help("delayed, tensorwise, blockwise, mxfp8", default="delayed")
    bf16: bool = _help("bf16 parameters and compute, fp32 master weights", default=False)

    def architecture(self) -> GPTArchitecture:
        base = preset(self.model_preset) if self.model_preset else None
        shape_fields = {f.name for f in dataclasses.fields(GPTArchitecture)}
        given = {k: v for k, v in dataclasses.asdict(self).items() if k in shape_fields and v is not None}
        if self.untie_embeddings_and_output_weights:
            given["untie_embeddings_and_output_weights"] = True
        if self.qk_layernorm:
            given["qk_layernorm"] = True
        if base is not None:
            return dataclasses.replace(base, **given)
        required = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
        missing = [f"--{name.replace('_', '-')}" for name in required if name not in given]
        if missing:
            raise ValueError(f"model shape incomplete: give --model-preset or {' '.join(missing)}")
        given.setdefault("num_query_groups", given["num_attention_heads"])
        given.setdefault("max_position_embeddings", self.seq_length)
        given.setdefault("untie_embeddings_and_output_weights", False)
        return GPTArchitecture(**given)


@dataclass
class ParallelOptions:
    tensor_model_parallel_size: int = _help("TP ranks", default=1)
    pipeline_model_parallel_size: int = _help("PP stages", default=1)
    virtual_pipeline_model_parallel_size: int | None = _help("model chunks per PP stage", default=None)
    expert_model_parallel_size: int = _help("EP ranks", default=1)
    context_parallel_size: int = _help("CP ranks (needs Transformer Engine)", default=1)
    sequence_parallel: bool = _help("sequence parallelism (with TP)", default=False)
    use_distributed_optimizer: bool = _help("shard optimizer state over data-parallel ranks", default=False)


@dataclass
class TrainingOptions:
    micro_batch_size: int = _help("samples per micro-batch", default=1)
    global_batch_size: int | None = _help("samples per optimizer step (default: micro x data-parallel)", default=None)
    train_iters: int = _help("optimizer steps of the whole run, both TST phases", default=1000)
    lr: float = _help("peak learning rate", default=3e-4)
    min_lr: float = _help("learning rate at the end of the decay", default=0.0)
    lr_warmup_iters: int = _help("linear warm-up steps", default=0)
    lr_decay_style: str = _help("constant, linear, cosine, inverse-square-root or WSD", default="WSD")
    lr_decay_iters: int | None = _help("defaults to --train-iters", default=None)
    lr_wsd_decay_iters: int | None = _help("WSD decay steps (default: 10%% of --train-iters)", default=None)
    lr_wsd_decay_style: str = _help("exponential, linear, cosine or minus_sqrt", default="linear")
    weight_decay: float = _help("AdamW weight decay", default=0.1)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.95)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    clip_grad: float = _help("gradient-norm clip (0: off)", default=1.0)
    seed: int = _help("random seed (weights, data order)", default=1234)


@dataclass
class DataOptions:
    data_path: list = _help("dataset prefix, or 'w1 prefix1 w2 prefix2 ...'", default_factory=list)
    split: str = _help("train,valid,test document split", default="969,30,1")
    tokenizer_type: str | None = _help("SentencePieceTokenizer, HuggingFaceTokenizer or NullTokenizer", default=None)
    tokenizer_model: str | None = _help("tokenizer file or folder", default=None)
    eod_mask_loss: bool = _help("do not train on the token that follows an EOD", default=False)
    allow_data_repetition: bool = _help("let a phase read its documents more than once", default=False)
    data_cache_path: str | None = _help("where dataset indices are cached", default=None)


@dataclass
class CheckpointOptions:
    save: str | None = _help("checkpoint directory to write", default=None)
    load: str | None = _help("checkpoint directory to resume from", default=None)
    save_interval: int | None = _help("save every N steps (and always at the end)", default=None)
    exit_interval: int | None = _help("save and exit after an iteration that is a multiple of N", default=None)
    exit_at_phase_switch: bool = _help("save and exit when TST phase 1 ends (the launcher's phase-1 job)",
                                       default=False)


@dataclass
class LoggingOptions:
    log_interval: int = _help("steps between metric lines", default=10)
    eval_interval: int | None = _help("steps between validations", default=None)
    eval_iters: int = _help("validation micro-batches per data-parallel rank", default=10)
    tensorboard_dir: str | None = _help("write TensorBoard scalars here", default=None)
    peak_flops: float | None = _help("peak FLOP/s per device, for MFU", default=None)


@dataclass
class TSTOptions:
    tst_bag_size: int | None = _help("bag size s; leave out for a baseline run", default=None)
    tst_ratio: float | None = _help("fraction r of --train-iters in superposition", default=None)
    tst_iters: int | None = _help("superposition steps (instead of --tst-ratio)", default=None)
    tst_loss_weighting: str = _help(f"{', '.join(WEIGHTINGS)} or comma-separated floats", default="uniform")
    tst_mode: str = _help(f"{', '.join(MODES)}", default="full")

    def plan(self, train_iters: int) -> TSTPlan | None:
        if self.tst_bag_size is None:
            if self.tst_ratio is not None or self.tst_iters is not None:
                raise ValueError("--tst-ratio/--tst-iters need --tst-bag-size")
            return None
        weighting = self.tst_loss_weighting
        if weighting not in WEIGHTINGS:
            try:
                weighting = tuple(float(w) for w in weighting.split(","))
            except ValueError:
                raise ValueError(f"--tst-loss-weighting must be one of {', '.join(WEIGHTINGS)} or "
                                 f"comma-separated floats, got {self.tst_loss_weighting!r}") from None
        if self.tst_ratio is None and self.tst_iters is None:
            raise ValueError("--tst-bag-size needs --tst-ratio r (0 < r < 1) or --tst-iters")
        return TSTPlan(bag_size=self.tst_bag_size, total_iters=train_iters, ratio=self.tst_ratio,
                       switch_iter=self.tst_iters, loss_weighting=weighting, mode=self.tst_mode)


@dataclass
class PretrainConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    data: DataOptions = field(default_factory=DataOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    logging: LoggingOptions = field(default_factory=LoggingOptions)
    tst: TSTOptions = field(default_factory=TSTOptions)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="megatron_tst pretraining (Megatron-LM flags)",
                                     allow_abbrev=False)
    hints = typing.get_type_hints(PretrainConfig)
    for group_field in dataclasses.fields(PretrainConfig):
        group_type = hints[group_field.name]
        group = parser.add_argument_group(group_field.name)
        group_hints = typing.get_type_hints(group_type)
        for option in dataclasses.fields(group_type):
            kind = group_hints[option.name]
            help_text = option.metadata.get("help", "")
            if kind is bool:
                group.add_argument(_flag(option.name), dest=option.name, action="store_true", help=help_text)
            elif kind is list:
                group.add_argument(_flag(option.name), dest=option.name, nargs="+", default=[], help=help_text)
            else:
                base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
                group.add_argument(_flag(option.name), dest=option.name, type=base, default=None,
                                   help=help_text)
    return parser


def parse_args(argv=None) -> PretrainConfig:
    namespace = vars(build_parser().parse_args(argv))
    hints = typing.get_type_hints(PretrainConfig)
    groups = {}
    for group_field in dataclasses.fields(PretrainConfig):
        group_type = hints[group_field.name]
        values = {f.name: namespace[f.name] for f in dataclasses.fields(group_type)
                  if namespace[f.name] is not None and namespace[f.name] != []}
        values = {k: v for k, v in values.items() if not (v is False)}
        groups[group_field.name] = group_type(**values)
    config = PretrainConfig(**groups)
    validate(config)
    return config


def validate(config: PretrainConfig) -> None:
    """One-line errors for settings that cannot work, before anything is built."""
    model, training, par = config.model, config.training, config.parallel
    if model.normalization != "RMSNorm":
        raise ValueError(f"--normalization {model.normalization} is not supported; use RMSNorm")
    if model.position_embedding_type != "rope":
        raise ValueError(f"--position-embedding-type {model.position_embedding_type} is not supported; use rope")
    if training.train_iters < 1:
        raise ValueError(f"--train-iters must be >= 1, got {training.train_iters}")
    if training.lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
        raise ValueError(f"--lr-decay-style {training.lr_decay_style} is not one of constant, linear, "
                         "cosine, inverse-square-root, WSD")
    config.tst.plan(training.train_iters)  # raises on a bad TST setting
    arch = model.architecture()
    if arch.max_position_embeddings < model.seq_length:
        raise ValueError(f"--seq-length {model.seq_length} exceeds --max-position-embeddings "
                         f"{arch.max_position_embeddings}")
    if par.context_parallel_size > 1 and not transformer_engine_available():
        raise ValueError("--context-parallel-size > 1 needs Transformer Engine (megatron-core 0.16.1 has "
                         "context-parallel attention only there); install it or use --context-parallel-size 1")
    if par.context_parallel_size > 1 and model.seq_length % (2 * par.context_parallel_size):
        raise ValueError(f"--seq-length {model.seq_length} must divide by 2 x --context-parallel-size")
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if arch.num_layers % par.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers {arch.num_layers} does not divide into "
                         f"{par.pipeline_model_parallel_size} pipeline stages")


def wsd_decay_iters(training: TrainingOptions) -> int:
    return training.lr_wsd_decay_iters or max(1, math.ceil(0.1 * training.train_iters))
