"""Token Superposition Training: fold, embedding, loss, phase plan and the model that ties them."""

from megatron_tst.tst.embedding import BagVocabParallelEmbedding, TSTLanguageModelEmbedding
from megatron_tst.tst.fold import (
    IGNORE_INDEX,
    MODES,
    fold_labels,
    fold_sample,
    fold_tokens,
    next_tokens_windows,
    raw_sample_length,
    split_sample,
)
from megatron_tst.tst.loss import (
    WEIGHTINGS,
    bag_weights,
    fused_vocab_parallel_mce,
    listing3_target_weights,
    mce_loss_reference,
    mce_target_weights,
    target_entropy,
)
from megatron_tst.tst.linear_loss import fused_linear_mce
from megatron_tst.tst.loss_kernels import single_kernel_mce
from megatron_tst.tst.model import TSTGPTModel, mask_labels, num_valid_targets
from megatron_tst.tst.plan import RECOVERY, SUPERPOSITION, TSTPlan

__all__ = [
    "BagVocabParallelEmbedding", "IGNORE_INDEX", "MODES", "RECOVERY", "SUPERPOSITION", "TSTGPTModel",
    "TSTLanguageModelEmbedding", "TSTPlan", "WEIGHTINGS", "bag_weights", "fold_labels", "fold_sample", "fold_tokens",
    "fused_linear_mce", "fused_vocab_parallel_mce", "listing3_target_weights", "mask_labels", "mce_loss_reference",
    "mce_target_weights", "num_valid_targets", "next_tokens_windows", "raw_sample_length", "single_kernel_mce", "split_sample",
    "target_entropy",
]
