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

from megatron_tst import megatron_lm_flags, profiling
from megatron_tst.logging_wandb import wandb_problem
from megatron_tst.megatron_lm_flags import MegatronLMOptions
from megatron_tst.models import (
    PRESETS, GPTArchitecture, default_transformer_impl, preset, transformer_engine_available,
)
from megatron_tst.models.sdpa_attention import BACKENDS, core_attention_kind, unsupported_reason
from megatron_tst.tst import MODES, WEIGHTINGS, TSTPlan


def _help(text, **kwargs):
    return field(metadata={"help": text}, **kwargs)


def _refused(reason, **kwargs):
    """A Megatron-LM flag that parses (so a recipe can be checked anywhere) and is refused in one
    line when given: ``validate`` raises "--flag: reason"."""
    return field(metadata={"help": f"refused: {reason}", "refused": reason}, **kwargs)


def _no_op(why, **kwargs):
    return field(metadata={"help": f"accepted, no effect: {why}"}, **kwargs)


@dataclass
class ModelOptions:
    model_preset: str | None = _help(f"named shape: {', '.join(PRESETS)} (the paper's Llama/Qwen3 "
                                     "models); without it the model is Megatron-LM's GPT unless flags say "
                                     "otherwise", default=None)
    num_layers: int | None = _help("transformer layers", default=None)
    hidden_size: int | None = _help("hidden size", default=None)
    ffn_hidden_size: int | None = _help("MLP inner size (default as Megatron-LM: 4 x hidden, with --swiglu "
                                        "2/3 of that rounded down to a multiple of 64)", default=None)
    num_attention_heads: int | None = _help("attention heads", default=None)
    group_query_attention: bool = _help("grouped-query attention with --num-query-groups groups "
                                        "(Megatron-LM's default 1 group if not given)", default=False)
    num_query_groups: int | None = _help("key/value heads; given alone it also means grouped-query attention",
                                         default=None)
    kv_channels: int | None = _help("head dimension (default hidden / heads)", default=None)
    vocab_size: int | None = _help("NullTokenizer's ids before its EOD (vocabulary N+1, EOD N, as Megatron-LM) or "
                                   "TikTokenizer's vocabulary; with another tokenizer it must equal its size",
                                   default=None)
    make_vocab_size_divisible_by: int | None = _help("pad the embedding's rows to a multiple of this x "
                                                     "--tensor-model-parallel-size (default 128, as Megatron-LM)",
                                                     default=None)
    seq_length: int = _help("latent positions per sample (the model's sequence length)", default=1024)
    max_position_embeddings: int | None = _help("defaults to --seq-length", default=None)
    position_embedding_type: str | None = _help("learned_absolute (Megatron-LM's default) or rope "
                                                "(the presets')", default=None)
    no_position_embedding: bool = _help("Megatron-LM's deprecated switch: no learned position table; "
                                        "accepted with rope positions only, as there", default=False)
    rotary_base: int | None = _help("RoPE base (default 10000 as Megatron-LM; the preset's)", default=None)
    rotary_percent: float | None = _help("fraction of each head's dimensions that RoPE rotates (default 1.0)",
                                         default=None)
    normalization: str | None = _help("LayerNorm (Megatron-LM's default) or RMSNorm (the presets')", default=None)
    apply_layernorm_1p: bool = _help("zero-centred norm weights (weight + 1; needs Transformer Engine)",
                                     default=False)
    norm_epsilon: float | None = _help("LayerNorm/RMSNorm epsilon (default 1e-5)", default=None)
    swiglu: bool = _help("SwiGLU MLP instead of GeLU (presets are SwiGLU)", default=False)
    disable_bias_linear: bool = _help("no biases in the linear layers (presets have none)", default=False)
    untie_embeddings_and_output_weights: bool = _help("separate input embedding and output head "
                                                      "(the paper's models; presets are untied)", default=False)
    tie_embeddings_and_output_weights: bool = _help("share the input embedding with the output head (ours: "
                                                    "ties a preset; without a preset tied is the default)",
                                                    default=False)
    attention_dropout: float | None = _help("attention dropout (default 0.1 as Megatron-LM; presets 0)",
                                            default=None)
    hidden_dropout: float | None = _help("hidden-state dropout (default 0.1 as Megatron-LM; presets 0)",
                                         default=None)
    num_experts: int | None = _help("MoE experts per layer", default=None)
    moe_router_topk: int | None = _help("experts per token", default=None)
    moe_ffn_hidden_size: int | None = _help("expert inner size", default=None)
    moe_aux_loss_coeff: float | None = _help("load-balancing loss weight", default=None)
    moe_router_load_balancing_type: str = _help("aux_loss, seq_aux_loss, global_aux_loss, sinkhorn or none",
                                                default="aux_loss")
    moe_grouped_gemm: bool = _help("grouped GEMM for the experts (needs Transformer Engine; on by "
                                   "default with it)", default=False)
    moe_token_dispatcher_type: str = _help("alltoall or allgather", default="alltoall")
    qk_layernorm: bool = _help("RMSNorm on queries and keys (Qwen3)", default=False)
    init_method_std: float | None = _help("weight init standard deviation", default=None)
    recompute_granularity: str | None = _help("activation recomputation: selective (attention scores) or full "
                                              "(whole layers, with --recompute-method)", default=None)
    recompute_method: str | None = _help("with full recomputation: uniform (every --recompute-num-layers layers "
                                         "one unit) or block (the first --recompute-num-layers layers)", default=None)
    recompute_num_layers: int | None = _help("layers per recomputed unit (uniform) or recomputed (block)",
                                             default=None)
    use_mcore_models: bool = _no_op("models are always megatron-core's", default=False)
    calculate_per_token_loss: bool = _no_op("the loss is always the mean over the global batch's tokens",
                                            default=False)
    transformer_impl: str | None = _help("local or transformer_engine (default: TE when usable)", default=None)
    fp8_format: str | None = _help("e4m3 or hybrid (Transformer Engine)", default=None)
    fp8_recipe: str | None = _help("with --fp8-format: delayed (the default), tensorwise, blockwise or mxfp8",
                                   default=None)
    fp8_amax_history_len: int | None = _help("delayed scaling: amax history length (with --fp8-format)",
                                             default=None)
    fp8_amax_compute_algo: str | None = _help("delayed scaling: most_recent or max (with --fp8-format)",
                                              default=None)
    fp8_param_gather: bool = _help("keep parameters in FP8 and all-gather them in FP8 (with --fp8-format)",
                                   default=False)
    bf16: bool = _help("bf16 parameters and compute, fp32 master weights", default=False)
    fp16: bool = _help("fp16 parameters and compute, fp32 master weights, loss scaling (megatron-core's "
                       "Float16OptimizerWithFloat16Params and grad scalers, as Megatron-LM); a step whose "
                       "gradients overflow is skipped (no update, no LR step)", default=False)
    # Megatron-LM's fusions, on by default with Transformer Engine (see ``fusion_settings``)
    no_gradient_accumulation_fusion: bool = _help("do not fuse weight-gradient accumulation into the GEMM",
                                                  default=False)
    no_bias_swiglu_fusion: bool = _help("do not fuse the SwiGLU activation", default=False)
    no_rope_fusion: bool = _help("do not fuse rotary position embedding", default=False)
    no_masked_softmax_fusion: bool = _help("do not fuse scale, mask and softmax", default=False)
    no_bias_gelu_fusion: bool = _help("do not fuse bias and GeLU (fused only with biases, as Megatron-LM)",
                                      default=False)
    no_bias_dropout_fusion: bool = _help("do not fuse bias, dropout and the residual add", default=False)
    # ours: megatron-core's torch.compile fusions on a CPU, where they are off by default (``compiled_fusion``)
    bias_swiglu_fusion: bool = _help("on a CPU too: megatron-core's compiled SwiGLU (torch.compile; on by "
                                     "default on a GPU)", default=False)
    bias_dropout_fusion: bool = _help("on a CPU too: megatron-core's compiled bias-dropout-add (torch.compile; on "
                                      "by default on a GPU)", default=False)
    # --- a fast step without Transformer Engine (issue 19); checked in check_attention_backend ---
    attention_backend: str = _help("auto, flash, fused, unfused or local. auto: Transformer Engine's attention "
                                   "where it is used, else flash; flash without TE: torch's fused SDPA kernels; "
                                   "local/unfused without TE: megatron-core's DotProductAttention", default="auto")
    cross_entropy_loss_fusion: bool = _help("megatron-core's fused vocab-parallel cross-entropy for next-token "
                                            "steps (torch.compile; TST phase 1 keeps its own MCE)", default=False)
    cross_entropy_fusion_impl: str = _help("native (megatron-core's torch.compile kernel) or te (Transformer "
                                           "Engine's)", default="native")
    # Loss kernels (megatron_tst/tst/linear_loss.py). Off by default: on CPU it saves memory but is
    # not faster than the unfused layer (BENCHMARKS.md); not measured on a GPU. With it a next-token run (no TST flags)
    # builds the TSTGPTModel too, whose state dict is a GPTModel's.
    output_layer_loss_fusion: bool = _help("fuse the output layer with the loss in the training forward: "
                                           "logits computed block by block and never stored", default=False)

    def architecture(self, vocab_size: int | None = None) -> GPTArchitecture:
        """The model the flags describe: the preset's shape with the flags' changes, or, without a
        preset, Megatron-LM's GPT with its defaults. ``vocab_size`` (the tokenizer's, which
        --vocab-size sets for NullTokenizer) wins over --vocab-size and the preset's."""
        base = preset(self.model_preset) if self.model_preset else None
        shape_fields = {f.name for f in dataclasses.fields(GPTArchitecture)}
        switches = ("untie_embeddings_and_output_weights", "qk_layernorm", "swiglu", "apply_layernorm_1p")
        given = {k: v for k, v in dataclasses.asdict(self).items()
                 if k in shape_fields and v is not None and k not in switches}
        if vocab_size is not None:
            given["vocab_size"] = vocab_size
        if self.untie_embeddings_and_output_weights and self.tie_embeddings_and_output_weights:
            raise ValueError("--untie-embeddings-and-output-weights and --tie-embeddings-and-output-weights "
                             "contradict each other; give one")
        if self.untie_embeddings_and_output_weights or self.tie_embeddings_and_output_weights:
            given["untie_embeddings_and_output_weights"] = self.untie_embeddings_and_output_weights
        for switch in ("qk_layernorm", "swiglu", "apply_layernorm_1p"):  # a switch left out keeps the preset's
            if getattr(self, switch):
                given[switch] = True
        if self.disable_bias_linear:
            given["add_bias_linear"] = False
        if base is not None:
            arch = dataclasses.replace(base, **given)
        else:
            required = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
            missing = [f"--{name.replace('_', '-')}" for name in required if name not in given]
            if missing:
                raise ValueError(f"model shape incomplete: give --model-preset or {' '.join(missing)}")
            hidden = given["hidden_size"]
            swiglu = given.get("swiglu", False)
            arch = GPTArchitecture(**{  # Megatron-LM's defaults
                "ffn_hidden_size": int(4 * hidden * 2 / 3 / 64) * 64 if swiglu else 4 * hidden,
                "num_query_groups": 1 if self.group_query_attention else given["num_attention_heads"],
                "max_position_embeddings": self.seq_length, "rotary_base": 10000, "norm_epsilon": 1e-5,
                "untie_embeddings_and_output_weights": False, "normalization": "LayerNorm", "swiglu": False,
                "position_embedding_type": "learned_absolute", "add_bias_linear": True, **given})
        if arch.num_experts and arch.moe_ffn_hidden_size is None:  # Megatron-LM's default
            arch = dataclasses.replace(arch, moe_ffn_hidden_size=arch.ffn_hidden_size)
        if self.no_position_embedding and arch.position_embedding_type != "rope":
            raise ValueError("--no-position-embedding (no learned position table) needs --position-embedding-type "
                             "rope, as in Megatron-LM; give it, or drop --no-position-embedding")
        return arch

    def dropouts(self) -> dict:
        """TransformerConfig's dropout fields: as given, else the presets' 0, Megatron-LM's 0.1 without one."""
        default = 0.0 if self.model_preset else 0.1
        return dict(hidden_dropout=default if self.hidden_dropout is None else self.hidden_dropout,
                    attention_dropout=default if self.attention_dropout is None else self.attention_dropout)


@dataclass
class ParallelOptions:
    tensor_model_parallel_size: int = _help("TP ranks", default=1)
    pipeline_model_parallel_size: int = _help("PP stages", default=1)
    virtual_pipeline_model_parallel_size: int | None = _help("model chunks per PP stage", default=None)
    expert_model_parallel_size: int = _help("EP ranks", default=1)
    context_parallel_size: int = _help("CP ranks (needs Transformer Engine)", default=1)
    sequence_parallel: bool = _help("sequence parallelism (no effect at --tensor-model-parallel-size 1, as "
                                    "Megatron-LM)", default=False)
    use_distributed_optimizer: bool = _help("shard optimizer state over data-parallel ranks", default=False)
    distributed_timeout_minutes: float = _help("how long a collective (or a wait for another rank) may "
                                               "take before the job fails", default=10)
    overlap_grad_reduce: bool = _help("overlap the gradient reduction with backward (default on with "
                                      "Transformer Engine on a GPU)", default=False)
    no_overlap_grad_reduce: bool = _help("turn the default --overlap-grad-reduce off", default=False)
    overlap_param_gather: bool = _help("overlap the distributed optimizer's parameter all-gather with the "
                                       "next forward (default on with Transformer Engine on a GPU)", default=False)
    no_overlap_param_gather: bool = _help("turn the default --overlap-param-gather off", default=False)

    def sequence_parallel_enabled(self) -> bool:
        # Megatron-LM turns it off at TP=1 (its recipes pass it with any TP size)
        return self.sequence_parallel and self.tensor_model_parallel_size > 1


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
    train_samples: int | None = _help("samples of the whole run instead of --train-iters, as Megatron-LM: "
                                      "iterations = samples // --global-batch-size, and the LR schedule counts "
                                      "samples; the TST switch stays r x the iterations", default=None)
    lr_warmup_samples: int | None = _help("warm-up samples (with --train-samples)", default=None)
    lr_decay_samples: int | None = _help("decay samples (with --train-samples; default all)", default=None)
    lr_wsd_decay_samples: int | None = _help("WSD decay samples (with --train-samples; default 10%% of them)",
                                             default=None)
    lr_warmup_fraction: float | None = _help("warm-up as a fraction of the decay steps (instead of "
                                             "--lr-warmup-iters/--lr-warmup-samples)", default=None)
    rampup_batch_size: list = _help("START INCR SAMPLES: the global batch grows from START by INCR over SAMPLES "
                                    "samples to --global-batch-size (Megatron-LM's; needs --train-samples). The TST "
                                    "switch stays in steps, so phase 1 reads the sum of its steps' batches",
                                    default_factory=list)
    loss_scale: float | None = _help("--fp16: a constant loss scale (megatron-core's ConstantGradScaler; default "
                                     "dynamic scaling)", default=None)
    initial_loss_scale: float | None = _help("--fp16 dynamic scaling: the first scale (default 2**32)", default=None)
    min_loss_scale: float | None = _help("--fp16 dynamic scaling: the smallest scale (default 1)", default=None)
    loss_scale_window: float | None = _help("--fp16 dynamic scaling: steps without overflow before the scale "
                                            "doubles (default 1000)", default=None)
    hysteresis: int | None = _help("--fp16 dynamic scaling: overflows tolerated before the scale halves "
                                   "(default 2)", default=None)
    decoupled_lr: float | None = _help("peak learning rate of the input embedding and output layer (megatron-core's "
                                       "decoupled LR param group; default --lr)", default=None)
    decoupled_min_lr: float | None = _help("minimum learning rate of the input embedding and output layer (with "
                                           "--decoupled-lr; default --min-lr)", default=None)
    grad_reduce_in_bf16: bool = _help("reduce gradients in bf16 (with --bf16; default fp32)", default=False)
    exit_duration_in_mins: float | None = _help("save and stop every rank after the step that ends this many "
                                                "minutes after the job started (the same command resumes)",
                                                default=None)
    manual_gc: bool = _help("Python's garbage collector only at --manual-gc-interval steps and around "
                            "validation (the same moment on every rank), as Megatron-LM", default=False)
    manual_gc_interval: int = _help("steps between collections with --manual-gc (0: only around validation)",
                                    default=0)
    empty_unused_memory_level: int = _help("CUDA: 1 empties the allocator's cache after each step, 2 also "
                                           "after validation (no effect without CUDA)", default=0)


@dataclass
class DataOptions:
    data_path: list = _help("dataset prefix, or 'w1 prefix1 w2 prefix2 ...'", default_factory=list)
    split: str = _help("train,valid,test document split", default="969,30,1")
    tokenizer_type: str | None = _help("SentencePieceTokenizer (GPTSentencePieceTokenizer, Llama2Tokenizer), "
                                       "HuggingFaceTokenizer (a local folder or tokenizer.json), GPT2BPETokenizer, "
                                       "TikTokenizer or NullTokenizer; Megatron-LM's BERT and multimodal ones are "
                                       "refused", default=None)
    tokenizer_model: str | None = _help("tokenizer file or folder", default=None)
    eod_mask_loss: bool = _help("do not train on the token that follows an EOD", default=False)
    allow_data_repetition: bool = _help("let a phase read its documents more than once", default=False)
    data_cache_path: str | None = _help("where dataset indices are cached", default=None)
    mock_data: bool = _help("megatron-core's synthetic documents instead of --data-path (benchmarks; both TST "
                            "phases; split by --split, read more than once if needed)", default=False)
    vocab_file: str | None = _help("GPT-2 vocab.json (with --tokenizer-type GPT2BPETokenizer, the default when "
                                   "--vocab-file and --merge-file are given)", default=None)
    merge_file: str | None = _help("GPT-2 merges.txt (with --tokenizer-type GPT2BPETokenizer)", default=None)
    tiktoken_pattern: str | None = _help("TikTokenizer's split pattern, v1 or v2 (needed with it, as Megatron-LM; "
                                         "other tokenizers do not read it, as in Megatron-LM)", default=None)
    tiktoken_num_special_tokens: int | None = _help("TikTokenizer: ids 0..N-1 are special tokens, the ranks follow "
                                                    "(default 1000, as Megatron-LM)", default=None)
    tokenizer_special_tokens: list = _help("TikTokenizer's special tokens in id order (with <unk> <s> </s> <mask> "
                                           "<pad> <cls> <sep>; </s> is the EOD)", default_factory=list)
    tiktoken_special_tokens: list = _help("Megatron-LM's deprecated name of --tokenizer-special-tokens",
                                          default_factory=list)
    legacy_tokenizer: bool = _refused("only megatron-core's tokenizers (Megatron-LM's default) are built here; "
                                      "drop it", default=False)
    tokenizer_sentencepiece_legacy: bool = _refused("SentencePiece's legacy wrapper is not built here (its ids "
                                                    "differ); drop it", default=False)
    tokenizer_hf_use_fast: bool = _refused("HuggingFaceTokenizer loads as Megatron-LM's default does; drop it",
                                           default=False)
    tokenizer_hf_include_special_tokens: bool = _refused("special tokens are never added to documents here; "
                                                         "drop it", default=False)
    trust_remote_code: bool = _refused("tokenizers with remote code are not loaded; drop it", default=False)
    tokenizer_metadata: str | None = _refused("tokenizer metadata files are not read; drop it", default=None)
    vocab_extra_ids: int | None = _refused("T5's span-masking ids; a GPT tokenizer has none: drop it", default=None)
    padded_vocab_size: int | None = _refused("the padded vocabulary is computed (the tokenizer's rounded up to "
                                             "128 x TP, as Megatron-LM); drop it", default=None)
    no_create_attention_mask_in_dataloader: bool = _no_op("the data never carries attention masks (the "
                                                          "attention builds the causal mask)", default=False)
    no_mmap_bin_files: bool = _refused("not supported yet: the .bin files are always memory-mapped; drop it",
                                       default=False)
    num_workers: int | None = _help("DataLoader worker processes reading the training samples (default 0: read "
                                    "in the training process; Megatron-LM's default is 2)", default=None)


@dataclass
class CheckpointOptions:
    save: str | None = _help("checkpoint directory to write", default=None)
    load: str | None = _help("checkpoint directory to resume from", default=None)
    save_interval: int | None = _help("save every N steps (and always at the end)", default=None)
    exit_interval: int | None = _help("save and exit after an iteration that is a multiple of N", default=None)
    exit_at_phase_switch: bool = _help("save and exit when TST phase 1 ends (the launcher's phase-1 job)",
                                       default=False)
    ckpt_format: str = _help("torch_dist (the only format)", default="torch_dist")
    async_save: bool = _help("write checkpoints in a background process (megatron-core's async torch_dist "
                             "writer): training goes on; each is renamed into place once written on every rank, "
                             "at the latest before the next save and at exit", default=False)
    use_persistent_ckpt_worker: bool = _no_op("--async-save forks a writer per save (megatron-core's "
                                              "TemporalAsyncCaller); the persistent worker needs CUDA in its "
                                              "spawned process", default=False)
    no_load_optim: bool = _help("resume with fresh optimizer state (the LR schedule continues)", default=False)
    no_load_rng: bool = _help("resume without the checkpoint's random-number state", default=False)
    no_save_optim: bool = _help("checkpoints without optimizer state (a resume from one starts fresh optimizer "
                                "state, as --no-load-optim)", default=False)
    no_save_rng: bool = _help("checkpoints without random-number state (a resume from one keeps the fresh "
                              "run's, as --no-load-rng)", default=False)
    finetune: bool = _help("load only --load's weights: a fresh run at iteration 0 (new optimizer, schedule, "
                           "RNG and data position); the same command later resumes from --save", default=False)


@dataclass
class LoggingOptions:
    log_interval: int = _help("steps between metric lines", default=10)
    eval_interval: int | None = _help("steps between validations", default=None)
    eval_iters: int = _help("validation micro-batches per data-parallel rank", default=10)
    tensorboard_dir: str | None = _help("write TensorBoard scalars here", default=None)
    peak_flops: float | None = _help("peak FLOP/s per device, for MFU", default=None)
    log_throughput: bool = _help("log model TFLOP/s per GPU (tokens/s are always logged)", default=False)
    profile: bool = _help("torch.profiler trace of --profile-step-start..--profile-step-end, written to "
                          "--tensorboard-dir (else <save>/profile) as Megatron-LM; on CUDA also an nsys capture range "
                          "(cudaProfilerStart/Stop)", default=False)
    profile_step_start: int | None = _help("first profiled step (default 10, as Megatron-LM)", default=None)
    profile_step_end: int | None = _help("step the profile ends at (default 12)", default=None)
    profile_ranks: list = _help("global ranks to profile (default 0)", default_factory=list)
    use_pytorch_profiler: bool = _help("accepted: --profile always writes a torch.profiler trace (and sets the "
                                       "nsys range on CUDA)", default=False)
    # Weights & Biases as Megatron-LM (megatron_tst/logging_wandb.py; checked in environment_problems)
    wandb_project: str | None = _help("log metrics.jsonl's records to this W&B project (the last rank logs; "
                                      "needs pip install 'megatron_tst[wandb]')", default=None)
    wandb_exp_name: str | None = _help("the W&B run's name (required with --wandb-project)", default=None)
    wandb_save_dir: str | None = _help("W&B's local files and the run id (default <save>/wandb; the launcher "
                                       "gives both phases <save>/wandb: one W&B run)", default=None)
    wandb_entity: str | None = _help("W&B team or user", default=None)


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
    megatron_lm: MegatronLMOptions = field(default_factory=MegatronLMOptions)  # aliases, pass-throughs


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
    megatron_lm_flags.add_to_parser(parser)  # every other Megatron-LM flag: a declared no-op or refused
    return parser


def _iterations_from_samples(namespace: dict) -> None:
    """--train-samples sets --train-iters (Megatron-LM: samples // global batch, or its ramp-up count)."""
    rampup = namespace["rampup_batch_size"]
    if rampup and namespace["train_samples"] is not None:  # without --train-samples: refused in validate
        try:
            start, increment, samples = (int(value) for value in rampup)
        except ValueError:
            raise ValueError(f"--rampup-batch-size takes three integers START INCR SAMPLES, got {' '.join(rampup)}") \
                from None
        final = namespace["global_batch_size"]
        if final is not None and not (0 < start < final and increment > 0 and samples >= 0
                                      and (final - start) % increment == 0):
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: need 0 < START < --global-batch-size "
                             f"{final}, INCR > 0 dividing {final} - START, SAMPLES >= 0")
    if namespace["train_samples"] is None:
        return
    if namespace["train_iters"] is not None:
        raise ValueError("--train-samples and --train-iters contradict each other; give one")
    if namespace["global_batch_size"] is None:
        raise ValueError("--train-samples needs --global-batch-size (iterations = samples // global batch size)")
    from megatron_tst.batch_schedule import BatchSchedule

    namespace["train_iters"] = BatchSchedule(namespace["global_batch_size"], namespace["rampup_batch_size"]
                                             ).iterations_for_samples(namespace["train_samples"])


def parse_args(argv=None, check: bool = True) -> PretrainConfig:
    """The config of ``argv``; ``check=False`` skips ``validate`` (to list what a recipe refuses)."""
    namespace = vars(build_parser().parse_args(argv))
    refused = megatron_lm_flags.refusals(namespace)  # Megatron-LM flags not taken here: refused even unchecked
    if refused:
        raise ValueError(refused[0])
    megatron_lm_flags.apply_aliases(namespace)
    _iterations_from_samples(namespace)
    if namespace["tokenizer_type"] is None and (namespace["vocab_file"] or namespace["merge_file"]):
        namespace["tokenizer_type"] = "GPT2BPETokenizer"  # Megatron-LM's GPT-3 recipes give only the two files
    hints = typing.get_type_hints(PretrainConfig)
    groups = {}
    for group_field in dataclasses.fields(PretrainConfig):
        group_type = hints[group_field.name]
        values = {f.name: namespace[f.name] for f in dataclasses.fields(group_type)
                  if namespace[f.name] is not None and namespace[f.name] != []}
        values = {k: v for k, v in values.items() if not (v is False)}
        groups[group_field.name] = group_type(**values)
    config = PretrainConfig(**groups)
    if check:
        validate(config)
    return config


FP8_FORMATS = ("e4m3", "hybrid")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def resolved_transformer_impl(model: ModelOptions) -> str:
    """--transformer-impl, or Transformer Engine where it is importable on a CUDA machine."""
    return model.transformer_impl or default_transformer_impl()


def gradient_accumulation_fusion_available() -> bool:
    # megatron-core's own linear layers (the output layer, even under the TE spec) need this CUDA
    # extension (Apex's) for the fusion; without it they refuse to build
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def activation_fusion(arch: GPTArchitecture, swiglu_on: bool, gelu_on: bool) -> bool:
    """megatron-core's fused activation where it has one: SwiGLU, or GeLU after a bias (Megatron-LM
    turns --bias-gelu-fusion off without biases; megatron-core's config refuses it)."""
    return swiglu_on if arch.swiglu else gelu_on and arch.add_bias_linear


def fusion_settings(config: PretrainConfig, arch: GPTArchitecture) -> dict:
    """TransformerConfig fields for the fusions Megatron-LM users get by default with Transformer
    Engine; each has Megatron-LM's --no-... switch. None without Transformer Engine (the local
    spec's numbers stay those of the plain torch ops)."""
    model = config.model
    if resolved_transformer_impl(model) != "transformer_engine":
        return {}
    return dict(
        gradient_accumulation_fusion=not model.no_gradient_accumulation_fusion
        and gradient_accumulation_fusion_available(),
        bias_activation_fusion=activation_fusion(arch, not model.no_bias_swiglu_fusion,
                                                 not model.no_bias_gelu_fusion),
        apply_rope_fusion=not model.no_rope_fusion,
        masked_softmax_fusion=not model.no_masked_softmax_fusion,
        bias_dropout_fusion=not model.no_bias_dropout_fusion,
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


def environment_problems(config: PretrainConfig) -> list[str]:
    """What this machine cannot run, one line each, led by the flag concerned."""
    model, par = config.model, config.parallel
    impl = resolved_transformer_impl(model)
    problems = []
    if impl == "transformer_engine" and not transformer_engine_available():
        problems.append("--transformer-impl transformer_engine needs Transformer Engine, which is not installed; "
                        "install it (pip install 'megatron_tst[te]' on a CUDA machine) or use --transformer-impl local")
    if impl == "local" and par.sequence_parallel_enabled():
        problems.append("--sequence-parallel needs Transformer Engine's layers: megatron-core's local spec "
                        "(torch norms) cannot run it; install Transformer Engine or drop --sequence-parallel")
    if impl == "local" and model.apply_layernorm_1p:
        problems.append("--apply-layernorm-1p needs Transformer Engine's norms (megatron-core's torch norms have "
                        "no zero-centred weights); install Transformer Engine or drop --apply-layernorm-1p")
    if impl == "local" and model.moe_grouped_gemm:
        problems.append("--moe-grouped-gemm needs Transformer Engine's grouped GEMM; install Transformer Engine "
                        "or drop --moe-grouped-gemm")
    arch = model.architecture(vocab_size=1)
    if impl == "local" and arch.num_experts and arch.add_bias_linear:
        # megatron-core 0.16.1's expert MLP adds its fc2 bias in place into RowParallelLinear's output,
        # a view autograd forbids modifying (mlp.py, the per_token_scale branch): the first step fails
        problems.append("MoE experts with biases (Megatron-LM's default; --disable-bias-linear not given) fail in "
                        "megatron-core 0.16.1's local expert MLP (it adds the bias in place into a view autograd "
                        "forbids changing); add --disable-bias-linear, or use Transformer Engine's layers")
    if (impl == "local" and not transformer_engine_available() and importlib.util.find_spec("apex") is not None
            and arch.normalization == "RMSNorm"):
        problems.append("Apex is installed without Transformer Engine: megatron-core's local spec then builds "
                        "Apex's FusedLayerNorm, which has no RMSNorm; install Transformer Engine or uninstall apex")
    try:
        check_attention_backend(config)
    except ValueError as error:
        problems.append(str(error))
    problems += megatron_lm_flags.environment_problems(config)
    wandb = wandb_problem(config.logging, config.checkpoint.save)
    if wandb:
        problems.append(wandb)
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    try:
        check_fp8(model.fp8_format, model.fp8_recipe or "delayed", impl, capability)
    except ValueError as error:
        problems.append(str(error))
    return problems


def check_environment(config: PretrainConfig) -> None:
    """What this machine cannot run (layer implementation, FP8, sequence parallelism, ...), refused
    in one line before any process group exists. Separate from ``validate`` so that a recipe's flags
    can be checked on a machine other than the one that runs it."""
    problems = environment_problems(config)
    if problems:
        raise ValueError(problems[0])


def refused_flags(config: PretrainConfig) -> list[str]:
    """"--flag: reason" for each given flag that is refused (declared with ``_refused``)."""
    refused = []
    for group in dataclasses.fields(PretrainConfig):
        options = getattr(config, group.name)
        for option in dataclasses.fields(options):
            reason = option.metadata.get("refused")
            if reason and getattr(options, option.name) not in (None, False, []):
                refused.append(f"{_flag(option.name)}: {reason}")
    return refused


def model_settings(config: PretrainConfig) -> dict:
    """TransformerConfig fields of the model flags that are not the model's shape: dropouts, MoE
    routing, FP8 scaling."""
    model = config.model
    settings = model.dropouts()
    if model.fp16:  # Megatron-LM's params_dtype torch.half (bf16 is transformer_config's own argument)
        settings.update(fp16=True, params_dtype=torch.float16, pipeline_dtype=torch.float16)
    if model.num_experts or (model.model_preset and preset(model.model_preset).num_experts):
        settings["moe_router_load_balancing_type"] = model.moe_router_load_balancing_type
    if model.moe_grouped_gemm:
        settings["moe_grouped_gemm"] = True
    if model.fp8_amax_history_len is not None:
        settings["fp8_amax_history_len"] = model.fp8_amax_history_len
    if model.fp8_amax_compute_algo is not None:
        settings["fp8_amax_compute_algo"] = model.fp8_amax_compute_algo
    if model.fp8_param_gather:
        settings["fp8_param"] = True
    if model.recompute_granularity:
        settings.update(recompute_granularity=model.recompute_granularity, recompute_method=model.recompute_method,
                        recompute_num_layers=model.recompute_num_layers)
    return settings


CROSS_ENTROPY_FUSION_IMPLS = ("native", "te")


def compiled_fusion(on: bool, off: bool) -> bool:
    """A megatron-core fusion that torch.compile builds (``megatron.core.jit.jit_fuser``), without
    Transformer Engine: on by default on a GPU, as Megatron-LM has it; on a CPU only when asked
    for, because every process pays a one-off compile (7-13 s each on the 2-core machine, a C++
    compiler needed) that short CPU runs and the tests would pay again and again."""
    return not off and (on or torch.cuda.is_available())


def torch_fusion_settings(config: PretrainConfig, arch: GPTArchitecture) -> dict:
    """TransformerConfig fields for megatron-core's fusions that need no Transformer Engine, with
    Megatron-LM's flags. Without TE (with TE ``fusion_settings`` sets them): the compiled SwiGLU
    (``bias_activation_fusion``; the GeLU one only on a GPU) and bias-dropout-add per
    ``compiled_fusion``; the RoPE fusion stays off (megatron-core's is TE's kernel, its
    TransformerConfig refuses it without TE)."""
    model = config.model
    settings = dict(cross_entropy_loss_fusion=model.cross_entropy_loss_fusion,
                    cross_entropy_fusion_impl=model.cross_entropy_fusion_impl)
    if resolved_transformer_impl(model) != "transformer_engine":
        settings.update(
            bias_activation_fusion=activation_fusion(
                arch, compiled_fusion(model.bias_swiglu_fusion, model.no_bias_swiglu_fusion),
                compiled_fusion(False, model.no_bias_gelu_fusion)),
            bias_dropout_fusion=compiled_fusion(model.bias_dropout_fusion, model.no_bias_dropout_fusion))
    return settings


def check_attention_backend(config: PretrainConfig) -> None:
    """--attention-backend and --cross-entropy-fusion-impl against the layer implementation this
    machine uses (one line, naming the fix)."""
    if config.model.cross_entropy_fusion_impl == "te" and not transformer_engine_available():
        raise ValueError("--cross-entropy-fusion-impl te needs Transformer Engine, which is not installed; "
                         "use --cross-entropy-fusion-impl native")
    backend = config.model.attention_backend
    if core_attention_kind(backend, resolved_transformer_impl(config.model)) == "sdpa":
        reason = unsupported_reason(context_parallel_size=config.parallel.context_parallel_size)
        if reason:
            raise ValueError(f"--attention-backend {backend} (torch SDPA): {reason}; "
                             "install Transformer Engine or use --context-parallel-size 1")


def validate(config: PretrainConfig) -> None:
    """One-line errors for settings that cannot work, before anything is built."""
    model, training, par = config.model, config.training, config.parallel
    refused = refused_flags(config)
    if refused:
        raise ValueError(refused[0])
    if model.transformer_impl not in (None, "local", "transformer_engine"):
        raise ValueError(f"--transformer-impl {model.transformer_impl} is not one of local, transformer_engine")
    if model.fp8_format is not None and model.fp8_format not in FP8_FORMATS:
        raise ValueError(f"--fp8-format {model.fp8_format} is not one of {', '.join(FP8_FORMATS)}")
    if model.attention_backend not in BACKENDS:
        raise ValueError(f"--attention-backend {model.attention_backend} is not one of {', '.join(BACKENDS)}")
    for fusion in ("bias_swiglu_fusion", "bias_dropout_fusion"):
        if getattr(model, fusion) and getattr(model, "no_" + fusion):
            flag = "--" + fusion.replace("_", "-")
            raise ValueError(f"{flag} and --no-{flag[2:]} contradict each other; give one")
    if model.cross_entropy_fusion_impl not in CROSS_ENTROPY_FUSION_IMPLS:
        raise ValueError(f"--cross-entropy-fusion-impl {model.cross_entropy_fusion_impl} is not one of "
                         f"{', '.join(CROSS_ENTROPY_FUSION_IMPLS)}")
    if model.fp8_recipe is not None and model.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"--fp8-recipe {model.fp8_recipe} is not one of {', '.join(FP8_RECIPES)}")
    if par.overlap_grad_reduce and par.no_overlap_grad_reduce:
        raise ValueError("--overlap-grad-reduce and --no-overlap-grad-reduce contradict each other; give one")
    if par.overlap_param_gather and par.no_overlap_param_gather:
        raise ValueError("--overlap-param-gather and --no-overlap-param-gather contradict each other; give one")
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
    for flag, value, allowed in (
            ("--normalization", model.normalization, NORMALIZATIONS),
            ("--position-embedding-type", model.position_embedding_type, POSITION_EMBEDDINGS),
            ("--moe-router-load-balancing-type", model.moe_router_load_balancing_type, LOAD_BALANCING),
            ("--fp8-amax-compute-algo", model.fp8_amax_compute_algo, ("most_recent", "max")),
            ("--ckpt-format", config.checkpoint.ckpt_format, ("torch_dist",))):
        if value is not None and value not in allowed:
            raise ValueError(f"{flag} {value} is not supported; use {' or '.join(allowed)}")
    check_fp8_settings(model, par)
    megatron_lm_flags.validate(config)
    check_recompute(model)
    profiling.check(config.logging, config.checkpoint)
    if config.data.num_workers is not None and config.data.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {config.data.num_workers}")
    check_tokenizer_flags(config.data)
    if config.data.mock_data and config.data.data_path:
        raise ValueError("--mock-data and --data-path contradict each other; give one")
    if model.rotary_percent is not None and not 0 < model.rotary_percent <= 1:
        raise ValueError(f"--rotary-percent must be in (0, 1], got {model.rotary_percent}")
    for flag, value in (("--attention-dropout", model.attention_dropout), ("--hidden-dropout", model.hidden_dropout)):
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    if training.train_iters < 1:
        raise ValueError(f"--train-iters must be >= 1, got {training.train_iters}")
    if training.decoupled_min_lr is not None and training.decoupled_lr is None:
        raise ValueError("--decoupled-min-lr needs --decoupled-lr; give it, or drop --decoupled-min-lr")
    check_fp16(model, training)
    if training.grad_reduce_in_bf16 and not model.bf16:
        raise ValueError("--grad-reduce-in-bf16 needs --bf16")
    if training.empty_unused_memory_level not in (0, 1, 2):
        raise ValueError(f"--empty-unused-memory-level must be 0, 1 or 2, got {training.empty_unused_memory_level}")
    if training.exit_duration_in_mins is not None and training.exit_duration_in_mins <= 0:
        raise ValueError(f"--exit-duration-in-mins must be > 0, got {training.exit_duration_in_mins}")
    samples = training.train_samples is not None
    if training.rampup_batch_size and not samples:
        raise ValueError("--rampup-batch-size needs --train-samples (Megatron-LM has no batch-size ramp-up for "
                         "iteration-based training); give --train-samples instead of --train-iters")
    for flag, given in (("--lr-warmup-iters", training.lr_warmup_iters), ("--lr-decay-iters", training.lr_decay_iters),
                        ("--lr-wsd-decay-iters", training.lr_wsd_decay_iters)):
        if samples and given:
            raise ValueError(f"{flag} with --train-samples: give {flag.replace('iters', 'samples')} instead")
    for flag, given in (("--lr-warmup-samples", training.lr_warmup_samples),
                        ("--lr-decay-samples", training.lr_decay_samples),
                        ("--lr-wsd-decay-samples", training.lr_wsd_decay_samples)):
        if given is not None and not samples:
            raise ValueError(f"{flag} needs --train-samples; give it, or {flag.replace('samples', 'iters')}")
    if training.lr_warmup_fraction is not None and (training.lr_warmup_iters or training.lr_warmup_samples):
        raise ValueError("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples contradict each other; give one")
    if training.lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
        raise ValueError(f"--lr-decay-style {training.lr_decay_style} is not one of constant, linear, "
                         "cosine, inverse-square-root, WSD")
    config.tst.plan(training.train_iters)  # raises on a bad TST setting
    arch = model.architecture(vocab_size=1)  # the tokenizer's size is known only once it is loaded
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
    if arch.num_layers % par.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers {arch.num_layers} does not divide into "
                         f"{par.pipeline_model_parallel_size} pipeline stages")


LOSS_SCALE_FLAGS = ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")


def check_fp16(model: ModelOptions, training: TrainingOptions) -> None:
    if model.fp16 and model.bf16:
        raise ValueError("--fp16 and --bf16 contradict each other; give one")
    given = [_flag(name) for name in LOSS_SCALE_FLAGS if getattr(training, name) is not None]
    if given and not model.fp16:
        raise ValueError(f"{given[0]} is fp16 loss scaling: give --fp16, or drop {given[0]}")
    if model.fp16 and model.fp8_format:
        raise ValueError("--fp8-format with --fp16 is not supported here (the recipes train FP8 with --bf16); "
                         "give --bf16")
    if training.loss_scale is not None and training.loss_scale <= 0:
        raise ValueError(f"--loss-scale must be > 0, got {training.loss_scale}")


def loss_scaling(training: TrainingOptions) -> dict:
    """OptimizerConfig's loss-scaling fields, Megatron-LM's defaults where a flag is absent."""
    defaults = dict(initial_loss_scale=2.0 ** 32, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2)
    scaling = {name: getattr(training, name) if getattr(training, name) is not None else default
               for name, default in defaults.items()}
    return dict(scaling, loss_scale=training.loss_scale)


def check_tokenizer_flags(data: DataOptions) -> None:
    from megatron_tst.data.tokenizers import (
        REFUSED_TYPES, SENTENCEPIECE_ALIASES, TIKTOKEN_PATTERNS, TOKENIZER_TYPES,
    )

    kind = data.tokenizer_type
    if kind in REFUSED_TYPES:
        raise ValueError(f"--tokenizer-type {kind} is not supported: {REFUSED_TYPES[kind]}")
    if kind is not None and kind not in TOKENIZER_TYPES + SENTENCEPIECE_ALIASES:
        raise ValueError(f"--tokenizer-type {kind} is not supported (this GPT pretraining takes "
                         f"{', '.join(TOKENIZER_TYPES + SENTENCEPIECE_ALIASES)}); convert it to a HuggingFace "
                         "tokenizer folder and use HuggingFaceTokenizer")
    if (data.vocab_file or data.merge_file) and kind != "GPT2BPETokenizer":
        raise ValueError(f"--vocab-file/--merge-file go with --tokenizer-type GPT2BPETokenizer, not {kind}; "
                         "drop them")
    if kind == "GPT2BPETokenizer" and not (data.vocab_file and data.merge_file):
        raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if kind == "GPT2BPETokenizer" and data.tokenizer_model:
        raise ValueError("--tokenizer-model does not go with GPT2BPETokenizer (it reads --vocab-file and "
                         "--merge-file); drop it")
    tiktoken_only = [flag for flag, given in (("--tiktoken-num-special-tokens", data.tiktoken_num_special_tokens),
                                              ("--tokenizer-special-tokens", data.tokenizer_special_tokens),
                                              ("--tiktoken-special-tokens", data.tiktoken_special_tokens)) if given]
    if tiktoken_only and kind != "TikTokenizer":
        raise ValueError(f"{tiktoken_only[0]} is read here only by --tokenizer-type TikTokenizer; drop it")
    if kind == "TikTokenizer" and data.tiktoken_pattern not in TIKTOKEN_PATTERNS:
        raise ValueError(f"--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2 (as Megatron-LM), "
                         f"not {data.tiktoken_pattern}")


def check_fp8_settings(model: ModelOptions, par: ParallelOptions) -> None:
    """FP8 settings megatron-core would ignore, or Megatron-LM refuses, in one line."""
    amax = (("--fp8-amax-history-len", model.fp8_amax_history_len is not None),
            ("--fp8-amax-compute-algo", model.fp8_amax_compute_algo is not None))
    for flag, given in (("--fp8-recipe", model.fp8_recipe is not None), *amax,
                        ("--fp8-param-gather", model.fp8_param_gather)):
        if given and model.fp8_format is None:
            raise ValueError(f"{flag} needs --fp8-format; give it, or drop {flag}")
    recipe = model.fp8_recipe or "delayed"
    for flag, given in amax:  # only megatron-core's TEDelayedScaling reads them
        if given and recipe != "delayed":
            raise ValueError(f"{flag} is delayed scaling's amax history; --fp8-recipe {recipe} scales from each "
                             f"tensor's current values and would ignore it: drop {flag} or use --fp8-recipe delayed")
    if model.fp8_param_gather and not par.use_distributed_optimizer:
        raise ValueError("--fp8-param-gather needs --use-distributed-optimizer (as Megatron-LM); give it, or drop "
                         "--fp8-param-gather")


def check_recompute(model: ModelOptions) -> None:
    """Megatron-LM's recomputation flags, their combinations refused in one line (megatron-core asserts)."""
    granularity, method, layers = model.recompute_granularity, model.recompute_method, model.recompute_num_layers
    if granularity not in (None, "full", "selective"):
        raise ValueError(f"--recompute-granularity {granularity} is not supported; use full or selective")
    if method not in (None, "uniform", "block"):
        raise ValueError(f"--recompute-method {method} is not supported; use uniform or block")
    if granularity != "full" and (method or layers is not None):
        raise ValueError("--recompute-method/--recompute-num-layers need --recompute-granularity full")
    if granularity == "full" and (method is None or layers is None or layers < 1):
        raise ValueError("--recompute-granularity full needs --recompute-method uniform|block and "
                         "--recompute-num-layers N >= 1")


def wsd_decay_iters(training: TrainingOptions) -> int:
    return training.lr_wsd_decay_iters or max(1, math.ceil(0.1 * training.train_iters))


def lr_schedule(training: TrainingOptions) -> tuple[dict, bool]:
    """OptimizerParamScheduler's step counts, and whether they count samples: in iterations, or with
    --train-samples in samples as Megatron-LM (an iteration advances it by its global batch size,
    which --rampup-batch-size makes vary)."""
    if training.train_samples is not None:
        total, increment = training.train_samples, True
        decay = training.lr_decay_samples or total
        warmup = training.lr_warmup_samples or 0
        wsd = training.lr_wsd_decay_samples or max(1, math.ceil(0.1 * total))
    else:
        total, increment = training.train_iters, False
        decay = training.lr_decay_iters or total
        warmup, wsd = training.lr_warmup_iters, wsd_decay_iters(training)
    if training.lr_warmup_fraction is not None:
        warmup = training.lr_warmup_fraction * decay
    return dict(lr_warmup_steps=warmup, lr_decay_steps=decay, wsd_decay_steps=wsd, wd_incr_steps=total), increment
