"""Model builders: GPT models on megatron-core, with the paper's Llama/Qwen3-MoE presets.

``GPTArchitecture`` spans Megatron-LM's GPT family: LayerNorm or RMSNorm (optionally zero-centred,
``--apply-layernorm-1p``), GeLU or SwiGLU, learned absolute or rotary positions, with or without
biases, tied or untied embeddings. Its defaults are the presets' (what checkpoints written before
these fields existed hold); a Megatron-LM flag set without a preset gets Megatron-LM's defaults
(``arguments.ModelOptions.architecture``).

Presets, dense: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied embeddings (the paper's
"Llama-3 modeling code" with SmolLM shapes and the Llama-3 vocabulary). MoE: the same plus
QK-norm, all-MoE layers with softmax top-k routing (normalised top-k probabilities, as Qwen3's
``norm_topk_prob``) and expert parallelism. The local (pure megatron-core) layer spec is used
where Transformer Engine is not importable (always on CPU), its spec where it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend

from megatron_tst.models.sdpa_attention import check_sdpa, core_attention_kind, with_core_attention
from megatron_tst.tst.loss import Weighting
from megatron_tst.tst.model import TSTGPTModel

LLAMA3_VOCAB = 128256
QWEN3_VOCAB = 151936


@dataclass(frozen=True)
class GPTArchitecture:
    """The shape of a model; parallelism and precision are chosen when building it."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int = 4096
    kv_channels: int | None = None  # head dim; hidden_size // num_attention_heads when None
    rotary_base: int = 500000
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_aux_loss_coeff: float = 1e-3
    # Megatron-LM's model-family switches; these defaults are the presets' (Llama) and keep older
    # checkpoints' run_config.json (which lacks them) describing the model they hold
    normalization: str = "RMSNorm"  # or LayerNorm
    swiglu: bool = True  # SwiGLU MLP (two input projections); False: GeLU
    position_embedding_type: str = "rope"  # or learned_absolute
    add_bias_linear: bool = False
    apply_layernorm_1p: bool = False  # zero-centred norm weights (Megatron-LM's --apply-layernorm-1p)
    rotary_percent: float = 1.0
    make_vocab_size_divisible_by: int = 128  # the embedding's rows: vocab padded to a multiple of this x TP

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def parameter_counts(self) -> dict[str, int]:
        """Total and active (per token) parameters, embeddings and output head included."""
        hidden, bias = self.hidden_size, int(self.add_bias_linear)
        norm = hidden * (2 if self.normalization == "LayerNorm" else 1)  # LayerNorm has a bias
        q_width, kv_width = self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        attention = (hidden + bias) * (q_width + 2 * kv_width) + q_width * hidden + bias * hidden
        attention += 2 * self.head_dim * (2 if self.normalization == "LayerNorm" else 1) if self.qk_layernorm else 0
        norms = 2 * norm

        def mlp(inner):
            up = inner * (2 if self.swiglu else 1)
            return (hidden + bias) * up + inner * hidden + bias * hidden

        if self.num_experts:
            expert = mlp(self.moe_ffn_hidden_size)
            router = hidden * self.num_experts
            layer_total = attention + norms + router + self.num_experts * expert
            layer_active = attention + norms + router + self.moe_router_topk * expert
        else:
            layer_total = layer_active = attention + norms + mlp(self.ffn_hidden_size)
        tables = (2 if self.untie_embeddings_and_output_weights else 1) * self.vocab_size * hidden
        if self.position_embedding_type == "learned_absolute":
            tables += self.max_position_embeddings * hidden
        rest = tables + norm  # + final norm
        return {
            "total": self.num_layers * layer_total + rest,
            "active": self.num_layers * layer_active + rest,
        }


# Shapes from the public SmolLM2/SmolLM3 configs with the Llama-3 vocabulary and untied embeddings
# (paper Section 3); "10B-A1B" is our Qwen3-MoE-like shape at 10.2B total / 1.1B active parameters
# (the paper does not publish its shape). RoPE base 500000 as Llama-3 (not stated in the paper).
PRESETS: dict[str, GPTArchitecture] = {
    "270M": GPTArchitecture(30, 576, 1536, 9, 3, LLAMA3_VOCAB, max_position_embeddings=8192),
    "600M": GPTArchitecture(32, 960, 2560, 15, 5, LLAMA3_VOCAB, max_position_embeddings=8192),
    "3B": GPTArchitecture(36, 2048, 11008, 16, 4, LLAMA3_VOCAB, max_position_embeddings=8192),
    "10B-A1B": GPTArchitecture(
        32, 1024, 3072, 16, 4, QWEN3_VOCAB, kv_channels=128, rotary_base=1000000, norm_epsilon=1e-6,
        qk_layernorm=True, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
        max_position_embeddings=8192,
    ),
    # Small shapes for CPU runs and tests.
    "tiny": GPTArchitecture(2, 64, 128, 4, 2, 512, max_position_embeddings=256),
    "tiny-moe": GPTArchitecture(
        2, 64, 128, 4, 2, 512, max_position_embeddings=256, qk_layernorm=True, num_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=64,
    ),
}


def preset(name: str, **changes) -> GPTArchitecture:
    """A named shape, optionally with some fields changed (``preset("tiny", num_layers=4)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **changes)


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of ``divisible_by * TP`` so every TP shard is equal."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def default_transformer_impl() -> str:
    """Transformer Engine where it is importable on a CUDA machine, megatron-core's local modules otherwise."""
    return "transformer_engine" if transformer_engine_available() and torch.cuda.is_available() else "local"


def transformer_config(
    arch: GPTArchitecture,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    transformer_impl: str | None = None,
    fp8_format: str | None = None,
    fp8_recipe: str = "delayed",
    moe_token_dispatcher_type: str = "alltoall",
    attention_backend: str = "auto",
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    **overrides,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for ``arch``; ``overrides`` are further config fields.

    ``transformer_impl`` None picks Transformer Engine when it is importable on a CUDA machine and
    megatron-core's local modules otherwise. ``attention_backend`` is Megatron-LM's
    ``--attention-backend``: with the local modules ``auto``/``flash`` build torch SDPA attention
    (``models/sdpa_attention.py``), ``local``/``unfused`` megatron-core's DotProductAttention.
    """
    transformer_impl = transformer_impl or default_transformer_impl()
    if transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError(
            "transformer_impl='transformer_engine' needs Transformer Engine, which is not installed; "
            "install it (pip install 'megatron_tst[te]' on a CUDA machine) or use transformer_impl='local'"
        )
    if fp8_format is not None and transformer_impl != "transformer_engine":
        raise ValueError(f"FP8 ({fp8_format}) needs transformer_impl='transformer_engine'")
    attention_kind = core_attention_kind(attention_backend, transformer_impl)
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        layernorm_zero_centered_gamma=arch.apply_layernorm_1p,
        gated_linear_unit=arch.swiglu,
        activation_func=F.silu if arch.swiglu else F.gelu,  # F.gelu: TransformerConfig's (Megatron-LM's) default
        add_bias_linear=arch.add_bias_linear,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=arch.init_method_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        transformer_impl=transformer_impl,
        attention_backend=AttnBackend[attention_backend],
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if fp8_format is not None:
        fields.update(fp8=fp8_format, fp8_recipe=fp8_recipe)
    if arch.num_experts:
        fields.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_router_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,  # softmax over the top-k: Qwen3's normalised top-k probs
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=transformer_impl == "transformer_engine",
        )
    fields.update(overrides)
    config = TransformerConfig(**fields)
    if attention_kind == "sdpa":
        check_sdpa(config)
    return config


def layer_spec(arch: GPTArchitecture, config: TransformerConfig):
    """The transformer layer ModuleSpec: Transformer Engine's when asked for, else the local one
    with the core attention ``config.attention_backend`` names."""
    if config.transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=arch.qk_layernorm,
        )
    spec = get_gpt_layer_local_spec(
        num_experts=arch.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm,
        normalization=arch.normalization,
    )
    return with_core_attention(spec, config)


def build_gpt_model(
    arch: GPTArchitecture,
    config: TransformerConfig,
    *,
    tst: bool = True,
    loss_weighting: Weighting = "uniform",
    output_layer_loss_fusion: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    seq_length: int | None = None,
) -> GPTModel:
    """A TSTGPTModel (``tst=True``) or a plain GPTModel of the same shape and state-dict layout.
    ``output_layer_loss_fusion`` (TSTGPTModel only): see ``TSTGPTModel``."""
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec(arch, config),
        vocab_size=padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size,
                                     arch.make_vocab_size_divisible_by),
        # a learned position table has max_position_embeddings rows (its shape is the checkpoint's)
        max_sequence_length=arch.max_position_embeddings if arch.position_embedding_type == "learned_absolute"
        else seq_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
        position_embedding_type=arch.position_embedding_type,
        rotary_percent=arch.rotary_percent,
        rotary_base=arch.rotary_base,
        vp_stage=vp_stage,
    )
    if tst:
        return TSTGPTModel(loss_weighting=loss_weighting, output_layer_loss_fusion=output_layer_loss_fusion, **kwargs)
    if output_layer_loss_fusion:
        raise ValueError("output_layer_loss_fusion needs the TSTGPTModel (tst=True)")
    return GPTModel(**kwargs)
