"""The fused output layer + MCE: hidden states and the output weight in, per-position losses out.

``fused_linear_mce(hidden, weight, labels, target_weights)`` equals
``single_kernel_mce(ColumnParallelLinear(hidden), labels, target_weights)`` but never holds the
N x V/tp logits: they are computed one row block at a time (``block_rows`` positions x this rank's
vocabulary shard), reduced into the row max, sum-exp and the s target logits, and dropped. Under
TP one all-gather of (N, s+2) statistics per call (``loss_kernels.vocab_parallel_stats``).
Backward recomputes the logits tile by tile (vocabulary tiles of ``vocab_tile`` rows outside, row
blocks inside), turns each tile in place into the logit gradient G (the same kernel as
``single_kernel_mce``) and accumulates grad_hidden += G W_tile and grad_weight_tile += G^T h. That
is one output GEMM more than the unfused layer (4 instead of 3) for a peak of one tile of logits
(plus, for bf16 weights, an fp32 N x H and one fp32 tile of the weight gradient) instead of all
the logits and their fp32 copy.

Parallelism as megatron-core's ColumnParallelLinear (no bias: GPT's output layer has none): the
hidden states enter through megatron-core's own mappings, ``copy_to_tensor_model_parallel_region``
(the gradient all-reduced over TP) or, with sequence parallelism,
``gather_from_sequence_parallel_region`` (all-gather along the sequence, gradient
reduce-scattered). The weight may be the shared embedding table (tied embeddings): its gradient
goes to whichever tensor is passed, so megatron-core's shared-embedding mechanism applies as is.

Bad input (checked on shapes and dtypes only, no host sync): the weight and hidden states of
different dtypes or widths, labels or weights of the wrong shape. Labels beyond the vocabulary
are checked where that costs no device sync (labels on the CPU) or with ``check_labels=True``
(``loss.check_label_range``); unchecked, such a target counts as off every shard (no out-of-bounds
read; its logit reads as 0).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from megatron_tst.tst.loss import _tp_group_or_none, check_label_range
from megatron_tst.tst.loss_kernels import (
    _run,
    _work_dtype,
    combine_stats,
    default_compile,
    loss_and_shares,
    shard_targets,
    write_logits_grad,
)

# logits per block: forward (block_rows = this // (V/tp)) and backward (block_rows x vocab_tile);
# on a GPU larger blocks keep the GEMMs efficient (M >= 512 at V = 128256)
BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
# backward: vocabulary rows per weight-gradient tile (its fp32 accumulator: tile x H, for bf16 weights)
VOCAB_TILE = {"cpu": 2048, "cuda": 8192}


def _blocks(rows, block_rows):
    return [(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]


class _LinearMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, tp_group, block_rows, vocab_tile, compile):
        rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
        vocab = weight.shape[0]
        h2d = hidden.reshape(-1, hidden.shape[-1])
        targets2d = targets.reshape(-1, targets.shape[-1])
        local_targets, off_shard = shard_targets(targets2d, rank * vocab, vocab)
        work = _work_dtype(hidden.dtype)
        rows = h2d.shape[0]
        row_max = torch.empty(rows, dtype=work, device=hidden.device)
        sum_exp = torch.empty_like(row_max)
        predicted = torch.empty(targets2d.shape, dtype=work, device=hidden.device)
        for start, end in _blocks(rows, block_rows):
            logits = torch.matmul(h2d[start:end], weight.t())  # the output layer's GEMM, one block
            row_max[start:end], sum_exp[start:end] = _run("stats", compile, logits)
            predicted[start:end] = logits.gather(-1, local_targets[start:end]).to(work)
        predicted.masked_fill_(off_shard, 0.0)
        lse, predicted = combine_stats(row_max, sum_exp, predicted, tp_group)
        loss, total, shares = loss_and_shares(lse, predicted, targets2d, target_weights.reshape(targets2d.shape))
        ctx.save_for_backward(hidden, weight, lse, total, local_targets, shares * ~off_shard)
        ctx.block_rows, ctx.vocab_tile, ctx.compile = block_rows, vocab_tile, compile
        return loss.reshape(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, lse, total, local_targets, local_shares = ctx.saved_tensors
        h2d = hidden.reshape(-1, hidden.shape[-1])
        scale = grad_output.reshape(-1).to(lse.dtype) * total
        work = _work_dtype(weight.dtype)
        # vocabulary tiles outside, row blocks inside: a tile's weight gradient is complete when its
        # rows are done (accumulated in fp32 for bf16 weights: one tile, never all of V x H); the
        # hidden-state gradient accumulates over the tiles (N x H)
        grad_weight = torch.empty_like(weight)
        grad_hidden = torch.zeros(h2d.shape, dtype=work, device=h2d.device)
        vocab = weight.shape[0]
        tile = min(vocab, ctx.vocab_tile)
        for v0 in range(0, vocab, tile):
            tile_weight = weight[v0:v0 + tile]
            width = tile_weight.shape[0]
            shifted = local_targets - v0
            off_tile = (shifted < 0) | (shifted >= width)
            tile_targets, tile_shares = shifted.masked_fill(off_tile, 0), local_shares.masked_fill(off_tile, 0.0)
            tile_grad = grad_weight[v0:v0 + tile] if work == weight.dtype else \
                torch.zeros(tile_weight.shape, dtype=work, device=weight.device)
            if work == weight.dtype:
                tile_grad.zero_()
            for start, end in _blocks(h2d.shape[0], ctx.block_rows):
                logits = torch.matmul(h2d[start:end], tile_weight.t())
                grad_logits = write_logits_grad(logits, lse[start:end], scale[start:end], tile_targets[start:end],
                                                tile_shares[start:end], ctx.compile)
                if work == weight.dtype:
                    grad_hidden[start:end].addmm_(grad_logits, tile_weight)
                    tile_grad.addmm_(grad_logits.t(), h2d[start:end])
                else:  # bf16 GEMMs, their (block, tile) partial sums added in fp32
                    grad_hidden[start:end] += torch.matmul(grad_logits, tile_weight)
                    tile_grad += torch.matmul(grad_logits.t(), h2d[start:end])
            if tile_grad.dtype != weight.dtype:
                grad_weight[v0:v0 + tile] = tile_grad
        return grad_hidden.to(hidden.dtype).reshape(hidden.shape), grad_weight, None, None, None, None, None, None


def fused_linear_mce(hidden, weight, labels, target_weights, tp_group=None, sequence_parallel=False,
                     block_rows=None, vocab_tile=None, compile=None, check_labels=False):
    """Per-position MCE of the column-parallel output layer ``hidden @ weight.T``, logits never stored.

    hidden [L(/tp with ``sequence_parallel``), b, H]; weight (V/tp, H), this rank's vocabulary
    shard (the output layer's weight, or the embedding table when tied); labels and target_weights
    [L, b, s] over the full sequence (global token ids, negative for ignored). Returns fp32 (fp64
    for fp64 inputs) losses [L, b]. ``block_rows``: positions per block (default: BLOCK_ELEMENTS
    logits per block); ``vocab_tile``: vocabulary rows per backward tile (default VOCAB_TILE);
    ``compile``: as ``single_kernel_mce``.
    """
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the output weight is {weight.dtype}; "
                         f"cast both to one dtype (the model's params dtype)")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"the output weight must be (V/tp, {hidden.shape[-1]}) for hidden states of width "
                         f"{hidden.shape[-1]}; got {tuple(weight.shape)}")
    group = _tp_group_or_none(tp_group)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    sequence_parallel = sequence_parallel and world > 1
    full_positions = (hidden.shape[0] * world,) + tuple(hidden.shape[1:-1]) if sequence_parallel \
        else tuple(hidden.shape[:-1])
    if labels.shape != target_weights.shape or tuple(labels.shape[:-1]) != full_positions:
        raise ValueError(
            f"labels {tuple(labels.shape)} and target weights {tuple(target_weights.shape)} must both be "
            f"(..., s) over the positions {full_positions} of the hidden states"
            + (" (gathered over the sequence-parallel ranks)" if sequence_parallel else "")
        )
    if check_labels or labels.device.type == "cpu":
        check_label_range(labels, weight.shape[0] * world)
    if world > 1:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group) \
            if sequence_parallel else copy_to_tensor_model_parallel_region(hidden, group=group)
    if block_rows is None:
        block_rows = max(1, BLOCK_ELEMENTS.get(hidden.device.type, BLOCK_ELEMENTS["cpu"]) // max(weight.shape[0], 1))
    if compile is None:
        compile = default_compile(hidden.device)
    if vocab_tile is None:
        vocab_tile = VOCAB_TILE.get(hidden.device.type, VOCAB_TILE["cpu"])
    return _LinearMCE.apply(hidden.contiguous(), weight, labels, target_weights, group, int(block_rows),
                            int(vocab_tile), compile)


class LossFusedColumnParallelLinear(ColumnParallelLinear):
    """GPT's output layer that, given ``mce_targets=(labels [L, b, s], target_weights)``, returns the
    per-position MCE [L, b] through ``fused_linear_mce`` instead of the logits. Called as the module
    (not its weight alone) so that the hooks megatron-core's DDP puts on it (the parameter
    all-gather of --overlap-param-gather) still run. Without ``mce_targets``: ColumnParallelLinear."""

    @classmethod
    def convert(cls, layer: ColumnParallelLinear) -> "LossFusedColumnParallelLinear":
        if layer.bias is not None:
            raise ValueError("the fused output layer + MCE has no bias; GPT's output layer has none")
        layer.__class__ = cls  # same parameters and state dict: only forward changes
        return layer

    def forward(self, input_, weight=None, runtime_gather_output=None, mce_targets=None, **kwargs):
        if mce_targets is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        labels, target_weights = mce_targets
        return fused_linear_mce(input_, self.weight if weight is None else weight, labels, target_weights,
                                tp_group=self.tp_group, sequence_parallel=self.sequence_parallel)
