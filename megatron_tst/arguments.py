"""Configuration: plain dataclasses, parsed from Megatron-LM's flag names.

Every field becomes ``--field-name`` (underscores to dashes), so the flags are Megatron-LM's where
Megatron has the option. Booleans are switches. ``--model-preset`` fills the model shape; explicit
model flags override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field

import torch

from megatron_tst.models import (
    PRESETS, GPTArchitecture, default_transformer_impl, preset, transformer_engine_available,
)
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
    tie_embeddings_and_output_weights: bool = _help("share the input embedding with the output head (ours: "
                                                    "ties a preset; without a preset tied is the default)",
                                                    default=False)
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
    # Megatron-LM's fusions, on by default with Transformer Engine (see ``fusion_settings``)
    no_gradient_accumulation_fusion: bool = _help("do not fuse weight-gradient accumulation into the GEMM",
                                                  default=False)
    no_bias_swiglu_fusion: bool = _help("do not fuse the SwiGLU activation", default=False)
    no_rope_fusion: bool = _help("do not fuse rotary position embedding", default=False)
    no_masked_softmax_fusion: bool = _help("do not fuse scale, mask and softmax", default=False)
    # Loss kernels (megatron_tst/tst/linear_loss.py). Off by default until the benchmarks
    # (examples/bench_mce.py --linear) say where it wins; with it a next-token run (no TST flags)
    # builds the TSTGPTModel too, whose state dict is a GPTModel's.
    output_layer_loss_fusion: bool = _help("fuse the output layer with the loss in the training forward: "
                                           "logits computed block by block and never stored", default=False)

    def architecture(self) -> GPTArchitecture:
        base = preset(self.model_preset) if self.model_preset else None
        shape_fields = {f.name for f in dataclasses.fields(GPTArchitecture)}
        switches = ("untie_embeddings_and_output_weights", "qk_layernorm")  # a switch left out keeps the preset's
        given = {k: v for k, v in dataclasses.asdict(self).items()
                 if k in shape_fields and v is not None and k not in switches}
        if self.untie_embeddings_and_output_weights and self.tie_embeddings_and_output_weights:
            raise ValueError("--untie-embeddings-and-output-weights and --tie-embeddings-and-output-weights "
                             "contradict each other; give one")
        if self.untie_embeddings_and_output_weights or self.tie_embeddings_and_output_weights:
            given["untie_embeddings_and_output_weights"] = self.untie_embeddings_and_output_weights
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
    distributed_timeout_minutes: float = _help("how long a collective (or a wait for another rank) may "
                                               "take before the job fails", default=10)
    overlap_grad_reduce: bool = _help("overlap the gradient reduction with backward (default on with "
                                      "Transformer Engine on a GPU)", default=False)
    no_overlap_grad_reduce: bool = _help("turn the default --overlap-grad-reduce off", default=False)
    overlap_param_gather: bool = _help("overlap the distributed optimizer's parameter all-gather with the "
                                       "next forward (default on with Transformer Engine on a GPU)", default=False)
    no_overlap_param_gather: bool = _help("turn the default --overlap-param-gather off", default=False)


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
    tst_ratio: float | None = _help("fraction r of --train-iters in superposition (1: no recovery)", default=None)
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
            raise ValueError("--tst-bag-size needs --tst-ratio r (0 < r <= 1) or --tst-iters")
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


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def resolved_transformer_impl(model: ModelOptions) -> str:
    """--transformer-impl, or Transformer Engine where it is importable on a CUDA machine."""
    return model.transformer_impl or default_transformer_impl()


def gradient_accumulation_fusion_available() -> bool:
    # megatron-core's own linear layers (the output layer, even under the TE spec) need this CUDA
    # extension (Apex's) for the fusion; without it they refuse to build
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_settings(config: PretrainConfig) -> dict:
    """TransformerConfig fields for the fusions Megatron-LM users get by default with Transformer
    Engine; each has Megatron-LM's --no-... switch. None without Transformer Engine (the local
    spec's numbers stay those of the plain torch ops)."""
    model = config.model
    if resolved_transformer_impl(model) != "transformer_engine":
        return {}
    return dict(
        gradient_accumulation_fusion=not model.no_gradient_accumulation_fusion
        and gradient_accumulation_fusion_available(),
        bias_activation_fusion=not model.no_bias_swiglu_fusion,
        apply_rope_fusion=not model.no_rope_fusion,
        masked_softmax_fusion=not model.no_masked_softmax_fusion,
        bias_dropout_fusion=True,
    )


def overlap_settings(config: PretrainConfig) -> dict:
    """DistributedDataParallelConfig overlap fields: on by default with Transformer Engine on a GPU
    (what Megatron-LM's recipes run), on anywhere when asked for, off with --no-overlap-...;
    the parameter all-gather overlap exists only with the distributed optimizer."""
    par = config.parallel
    default = resolved_transformer_impl(config.model) == "transformer_engine" and torch.cuda.is_available()
    grad = par.overlap_grad_reduce or (default and not par.no_overlap_grad_reduce)
    param = par.use_distributed_optimizer and (
        par.overlap_param_gather or (default and not par.no_overlap_param_gather))
    return dict(overlap_grad_reduce=grad, overlap_param_gather=param)


def check_fp8(fp8_format: str | None, fp8_recipe: str, transformer_impl: str,
              capability: tuple[int, int] | None) -> None:
    """FP8 needs Transformer Engine and a GPU generation that runs the recipe (``capability`` is
    torch.cuda.get_device_capability(), None without CUDA)."""
    if fp8_format is None:
        return
    if transformer_impl != "transformer_engine":
        why = "is not installed" if not transformer_engine_available() else "is not used (--transformer-impl local)"
        raise ValueError(f"--fp8-format needs Transformer Engine, which {why}; install it "
                         "(pip install 'megatron_tst[te]' on a CUDA machine) or drop --fp8-format")
    if capability is None:
        raise ValueError("--fp8-format needs a CUDA GPU; drop --fp8-format on this machine")
    if capability < (8, 9):
        raise ValueError(f"--fp8-format needs an Ada, Hopper or Blackwell GPU (compute capability >= 8.9); "
                         f"this one is {capability[0]}.{capability[1]}: drop --fp8-format and train in bf16")
    if fp8_recipe == "mxfp8" and capability < (10, 0):
        raise ValueError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability >= 10.0); this one is "
                         f"{capability[0]}.{capability[1]}: use --fp8-recipe delayed, tensorwise or blockwise")
    if fp8_recipe == "blockwise" and capability < (9, 0):
        raise ValueError(f"--fp8-recipe blockwise needs a Hopper or newer GPU (compute capability >= 9.0); "
                         f"this one is {capability[0]}.{capability[1]}: use --fp8-recipe delayed or tensorwise")


def check_environment(config: PretrainConfig) -> None:
    """What this machine cannot run (layer implementation, FP8, sequence parallelism), refused in
    one line before any process group exists. Separate from ``validate`` so that a recipe's flags
    can be checked on a machine other than the one that runs it."""
    model, par = config.model, config.parallel
    impl = resolved_transformer_impl(model)
    if impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError("--transformer-impl transformer_engine needs Transformer Engine, which is not installed; "
                         "install it (pip install 'megatron_tst[te]' on a CUDA machine) or use --transformer-impl local")
    if impl == "local" and par.sequence_parallel:
        raise ValueError("--sequence-parallel needs Transformer Engine's layers: megatron-core's local spec "
                         "(torch RMSNorm) cannot run it; install Transformer Engine or drop --sequence-parallel")
    if impl == "local" and not transformer_engine_available() and importlib.util.find_spec("apex") is not None:
        raise ValueError("Apex is installed without Transformer Engine: megatron-core's local spec then builds "
                         "Apex's FusedLayerNorm, which has no RMSNorm; install Transformer Engine or uninstall apex")
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    check_fp8(model.fp8_format, model.fp8_recipe, impl, capability)


def validate(config: PretrainConfig) -> None:
    """One-line errors for settings that cannot work, before anything is built."""
    model, training, par = config.model, config.training, config.parallel
    if model.transformer_impl not in (None, "local", "transformer_engine"):
        raise ValueError(f"--transformer-impl {model.transformer_impl} is not one of local, transformer_engine")
    if model.fp8_format is not None and model.fp8_format not in FP8_FORMATS:
        raise ValueError(f"--fp8-format {model.fp8_format} is not one of {', '.join(FP8_FORMATS)}")
    if model.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"--fp8-recipe {model.fp8_recipe} is not one of {', '.join(FP8_RECIPES)}")
    if par.overlap_grad_reduce and par.no_overlap_grad_reduce:
        raise ValueError("--overlap-grad-reduce and --no-overlap-grad-reduce contradict each other; give one")
    if par.overlap_param_gather and par.no_overlap_param_gather:
        raise ValueError("--overlap-param-gather and --no-overlap-param-gather contradict each other; give one")
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
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
    if par.distributed_timeout_minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes must be > 0, got {par.distributed_timeout_minutes}")
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if arch.num_layers % par.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers {arch.num_layers} does not divide into "
                         f"{par.pipeline_model_parallel_size} pipeline stages")


def wsd_decay_iters(training: TrainingOptions) -> int:
    return training.lr_wsd_decay_iters or max(1, math.ceil(0.1 * training.train_iters))
