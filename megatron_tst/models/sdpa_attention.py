"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (``--attention-backend
flash``, and ``auto`` without Transformer Engine).

megatron-core 0.16.1 has no fast attention without Transformer Engine: its local
``DotProductAttention`` repeats K/V for grouped-query attention, writes every [s, s] score matrix
and keeps the probabilities for backward. ``SDPAttention`` is a drop-in ``core_attention``
submodule for megatron-core's local layer spec (same constructor and forward signature, no
parameters, so checkpoints and the HF export do not change): torch picks a flash or
memory-efficient kernel. On CUDA only the fused kernels (flash, memory-efficient, cuDNN) are
allowed: a call none of them takes is a one-line error, never a silent math fallback. On CPU
torch's own choice (its flash-CPU or math kernel) is fine.

The reference in tests is megatron-core's ``DotProductAttention`` (``tests/test_attention.py``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = tuple(b.name for b in AttnBackend)  # flash, fused, unfused, local, auto (Megatron-LM's choices)
MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask)
FUSED_CUDA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def core_attention_kind(backend: str, transformer_impl: str) -> str:
    """What ``--attention-backend`` builds under ``transformer_impl``: "te" (Transformer Engine's
    attention; megatron-core passes the backend to it through NVTE_* variables), "sdpa" (ours) or
    "local" (megatron-core's DotProductAttention). Raises ValueError for a combination that cannot
    be built, naming the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"--attention-backend {backend} is not one of {', '.join(BACKENDS)}")
    if transformer_impl == "transformer_engine":
        if backend == "local":  # Megatron-LM's rule: local attention only with the local spec
            raise ValueError("--attention-backend local needs --transformer-impl local; "
                             "with Transformer Engine use auto, flash, fused or unfused")
        return "te"
    if backend == "fused":
        raise ValueError("--attention-backend fused is Transformer Engine's cuDNN attention, which is not "
                         "in use (not installed, or --transformer-impl local); use --attention-backend flash "
                         "(torch's fused kernels) or install Transformer Engine")
    return "sdpa" if backend in ("flash", "auto") else "local"


def unsupported_reason(context_parallel_size: int = 1, window_size=None, softmax_type: str = "vanilla") -> str | None:
    """Why SDPAttention cannot run these settings (a phrase naming the setting), or None."""
    if context_parallel_size > 1:
        return "context parallelism (--context-parallel-size > 1) needs Transformer Engine's attention"
    if window_size is not None:
        return "a sliding window (--window-size) is not taken by torch's fused attention kernels"
    if softmax_type != "vanilla":
        return f"--softmax-type {softmax_type} is not taken by torch's fused attention kernels"
    return None


def check_sdpa(config: TransformerConfig) -> None:
    reason = unsupported_reason(config.context_parallel_size, config.window_size, config.softmax_type)
    if reason:
        raise ValueError(f"--attention-backend {config.attention_backend.name} (torch SDPA): {reason}; "
                         "use --attention-backend local or install Transformer Engine")


class SDPAttention(MegatronModule):
    """megatron-core's core-attention contract on top of torch's scaled_dot_product_attention.

    Inputs are [s, b, heads, head_dim] per tensor-parallel rank (query heads and key/value groups
    already split by the linear layers), the output [s, b, heads * head_dim], as
    ``DotProductAttention``. Causal or unmasked; an explicit boolean ``attention_mask`` (True =
    masked out, megatron's convention) is passed on, which the flash kernel cannot take (torch then
    uses the memory-efficient one on CUDA)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        check_sdpa(config)
        if attn_mask_type not in MASK_TYPES:
            raise ValueError(f"--attention-backend flash takes causal or unmasked attention, not "
                             f"{attn_mask_type.name}; use --attention-backend local")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        # the scale megatron-core applies in the end: with apply_query_key_layer_scaling it divides
        # the scores by layer_number and the softmax multiplies them back (an fp16 range trick)
        head_dim = config.kv_channels
        self.softmax_scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("--attention-backend flash does not take packed sequences (THD); "
                             "use Transformer Engine's attention")
        if attention_bias is not None:
            raise ValueError("--attention-backend flash does not take an attention bias; use --attention-backend local")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
        mask, causal = None, mask_type == AttnMaskType.causal and q.size(2) > 1
        if attention_mask is not None:  # megatron's boolean mask, True where a score is masked out
            mask, causal = ~attention_mask, False
        dropout = self.dropout_p if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if gqa and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
            # fp32 on CUDA: only the memory-efficient kernel runs it, and it does not take grouped
            # K/V; repeat them (what DotProductAttention always does) rather than fail
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
            gqa = False
        with self._kernels(q.is_cuda), self._rng(dropout):
            try:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
            except RuntimeError as error:
                if not q.is_cuda or "No available kernel" not in str(error):
                    raise
                raise ValueError(
                    f"--attention-backend flash: no fused CUDA attention kernel (flash, memory-efficient, cuDNN) "
                    f"takes this call (dtype {q.dtype}, head dim {q.size(-1)}, {q.size(1)} query heads, "
                    f"{k.size(1)} key/value heads, mask {'given' if mask is not None else 'none'}); "
                    "train in --bf16, or use --attention-backend local") from None
        b, heads, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    @staticmethod
    def _kernels(cuda: bool):
        if not cuda:  # torch's CPU choice (flash-CPU or math) is fine
            return contextlib.nullcontext()
        return sdpa_kernel(FUSED_CUDA_KERNELS)

    def _rng(self, dropout: float):
        # as DotProductAttention: dropout draws from the tensor-parallel region's generator
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def with_core_attention(spec: ModuleSpec, config: TransformerConfig) -> ModuleSpec:
    """megatron-core's local layer ``spec`` with the core attention ``config.attention_backend``
    asks for: flash/auto -> SDPAttention, local/unfused -> megatron-core's DotProductAttention."""
    kind = core_attention_kind(config.attention_backend.name, config.transformer_impl)
    core = SDPAttention if kind == "sdpa" else DotProductAttention
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = core
    return spec
