"""TSTGPTModel: megatron-core's GPTModel that also trains on bags (phase 1 of TST).

Inputs (b, L) or (b, L, s) go through ``TSTLanguageModelEmbedding``; labels (b, L) take
megatron-core's own cross-entropy path (or, where it is the faster, ``single_kernel_mce`` at s = 1:
``loss_kernels.NEXT_TOKEN_SINGLE_KERNEL``), labels (b, L, s) the fused vocab-parallel MCE
(``megatron_tst.tst.loss``), returning per-position losses (b, L); the training loss is their sum
over the number of valid targets, ``num_valid_targets(labels)``. Ignored targets carry IGNORE_INDEX (fold a data loss mask into the labels with
``mask_labels``). The state dict is exactly a GPTModel's, so a phase-2 (next-token) model is a plain
GPTModel and the same checkpoint loads into either.

MoE router losses: megatron-core weighs the load-balancing and z losses by the positions routed,
while the training loss is divided by the valid targets, s per position in phase 1. The model
scales the router-loss coefficients by the targets per position of each batch it is given, so that
--moe-aux-loss-coeff weighs the same against the loss per position in both phases (the paper does
not say; left alone, phase 1 would balance the experts s times more weakly).
"""

from __future__ import annotations

import torch
from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.models.gpt import GPTModel

from megatron_tst.tst.embedding import TSTLanguageModelEmbedding
from megatron_tst.tst.fold import IGNORE_INDEX
from megatron_tst.tst.linear_loss import LossFusedColumnParallelLinear
from megatron_tst.tst.loss_kernels import next_token_uses_single_kernel, single_kernel_mce
from megatron_tst.tst.loss import Weighting, bag_weights, fused_vocab_parallel_mce, mce_target_weights


ROUTER_LOSSES = ("moe_aux_loss_coeff", "moe_z_loss_coeff")


class TSTGPTModel(GPTModel):
    """GPTModel + bag inputs + multi-hot CE. ``loss_weighting``: see ``loss.bag_weights``.

    ``output_layer_loss_fusion``: in the training forward (``self.training``, labels given) the
    output layer and the loss are one op, ``linear_loss.fused_linear_mce``, which never holds the
    logits; bag labels (b, L, s) and next-token labels (b, L) alike (the latter return 0, not
    megatron-core's value, at ignored positions: the loss masks them either way). Evaluation,
    inference and any call without labels get the logits and the unfused loss as before."""

    def __init__(self, *args, loss_weighting: Weighting = "uniform", output_layer_loss_fusion: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        # fail at build time rather than at the first step
        bag_weights(1 if isinstance(loss_weighting, str) else len(loss_weighting), loss_weighting)
        self.loss_weighting = loss_weighting
        if hasattr(self, "embedding"):
            TSTLanguageModelEmbedding.convert(self.embedding)
        self.router_loss_coefficients = {name: getattr(self.config, name, None) for name in ROUTER_LOSSES}
        self.output_layer_loss_fusion = output_layer_loss_fusion
        if output_layer_loss_fusion:
            for setting in ("mtp_num_layers", "defer_embedding_wgrad_compute"):
                if getattr(self.config, setting, None):
                    raise ValueError(f"--output-layer-loss-fusion does not support {setting} (megatron-core's "
                                     f"output-layer path): drop --output-layer-loss-fusion or {setting}")
            if self.post_process:
                LossFusedColumnParallelLinear.convert(self.output_layer)

    def forward(self, *args, labels: torch.Tensor | None = None, **kwargs):
        targets_per_position = labels.shape[-1] if labels is not None and labels.dim() == 3 else 1
        for name, base in self.router_loss_coefficients.items():
            if base:  # the routers read the shared config at every forward
                setattr(self.config, name, [c * targets_per_position for c in base]
                        if isinstance(base, (list, tuple)) else base * targets_per_position)
        return super().forward(*args, labels=labels, **kwargs)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        fused = (self.output_layer_loss_fusion and self.post_process and self.training and labels is not None
                 and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None
                 and not kwargs.get("mtp_in_postprocess") and not has_config_logger_enabled(self.config))
        if not fused:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        if labels.dim() not in (2, 3):
            raise ValueError(f"labels must be (batch, L) or (batch, L, s); got shape {tuple(labels.shape)}")
        weighting = self.loss_weighting if labels.dim() == 3 else "uniform"
        bags = (labels if labels.dim() == 3 else labels.unsqueeze(-1)).transpose(0, 1).contiguous()  # [L, b, s]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        losses = self.output_layer(hidden_states, weight=weight, mce_targets=(bags, mce_target_weights(bags, weighting)))
        return losses.transpose(0, 1).contiguous()

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if labels.dim() == 2:
            if self.config.cross_entropy_loss_fusion or not next_token_uses_single_kernel(logits.device):
                return super().compute_language_model_loss(labels, logits)
            # megatron-core's CE where it is the faster; else the single kernel, s = 1 (0, not
            # megatron-core's lse, at ignored positions: the loss masks them either way)
            labels = labels.transpose(0, 1).unsqueeze(-1).contiguous()
            loss = single_kernel_mce(logits, labels, (labels >= 0).float(), tp_group=self.pg_collection.tp)
            return loss.transpose(0, 1).contiguous()
        if labels.dim() != 3:
            raise ValueError(f"labels must be (batch, L) or (batch, L, s); got shape {tuple(labels.shape)}")
        # logits are [L, b, V/tp]; labels [b, L, s] -> [L, b, s]
        labels = labels.transpose(0, 1).contiguous()
        target_weights = mce_target_weights(labels, self.loss_weighting)
        loss = fused_vocab_parallel_mce(logits, labels, target_weights, tp_group=self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


def mask_labels(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels with IGNORE_INDEX where ``loss_mask`` (same shape, or one value per position) is 0."""
    if loss_mask is None:
        return labels
    if loss_mask.dim() == labels.dim() - 1:
        loss_mask = loss_mask.unsqueeze(-1)
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


def num_valid_targets(labels: torch.Tensor) -> torch.Tensor:
    """The loss normaliser: valid targets in (b, L) or (b, L, s) labels, as an integer tensor."""
    return (labels >= 0).sum()
