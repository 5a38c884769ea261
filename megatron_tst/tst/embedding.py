"""Bag-of-token embeddings (paper Listing 2) for megatron-core's vocab-parallel embedding.

Tokens (b, L) take the ordinary lookup. Tokens (b, L, s) become the mean of the s token embeddings,
summed in fp32 and cast back to the embedding's dtype. Under tensor parallelism each rank sums its
masked local lookups of all s slots and the bag costs a single reduction (all-reduce, or
reduce-scatter with sequence parallelism), in fp32, instead of s. Position ids stay 0..L-1 over
latent positions, and everything after the lookup (position embedding, [s b h] layout, sequence-
parallel scatter, dropout) is megatron-core's unchanged code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


class BagVocabParallelEmbedding(VocabParallelEmbedding):
    """A VocabParallelEmbedding that also embeds bags (b, L, s) as their mean. No new state."""

    def forward(self, input_):
        if input_.dim() == 2:
            return super().forward(input_)
        if input_.dim() != 3:
            raise ValueError(
                f"token ids must be (batch, L) or (batch, L, s); got shape {tuple(input_.shape)}"
            )
        bag_size = input_.shape[-1]
        tensor_parallel = self.tp_group.size() > 1
        if tensor_parallel:
            off_shard = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill_(off_shard, 0)  # no host sync
        else:
            local_ids = input_
        # One lookup for all slots: one weight-gradient scatter in backward, not s dense ones.
        slot_embeddings = self.weight[local_ids] if self.deterministic_mode else F.embedding(local_ids, self.weight)
        if tensor_parallel:
            slot_embeddings = slot_embeddings.masked_fill_(off_shard.unsqueeze(-1), 0.0)
        bag_sum = slot_embeddings.sum(dim=2, dtype=torch.float32)
        if self.reduce_scatter_embeddings:
            bag_sum = reduce_scatter_to_sequence_parallel_region(
                bag_sum.transpose(0, 1).contiguous(), group=self.tp_group
            )
        else:
            bag_sum = reduce_from_tensor_model_parallel_region(bag_sum, group=self.tp_group)
        return (bag_sum / bag_size).to(slot_embeddings.dtype)


class TSTLanguageModelEmbedding(LanguageModelEmbedding):
    """LanguageModelEmbedding whose word embedding takes tokens (b, L) or bags (b, L, s).

    Parameters, buffers and the sharded state dict are exactly the base class's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.word_embeddings.__class__ = BagVocabParallelEmbedding

    @classmethod
    def convert(cls, embedding: LanguageModelEmbedding) -> "TSTLanguageModelEmbedding":
        """Make an already built LanguageModelEmbedding bag-capable, in place.

        megatron-core's GPTModel builds its embedding itself; re-typing that instance (both classes
        add behaviour only, no state) keeps its parameters and the random draws of a plain model,
        where building a second embedding would initialise (and allocate) the table again.
        """
        if not isinstance(embedding, LanguageModelEmbedding):
            raise TypeError(f"expected a LanguageModelEmbedding, got {type(embedding).__name__}")
        embedding.__class__ = cls
        embedding.word_embeddings.__class__ = BagVocabParallelEmbedding
        return embedding
