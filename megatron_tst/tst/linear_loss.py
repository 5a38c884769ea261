"""The fused output layer + MCE: hidden states and the output weight in, per-position losses out.

``fused_linear_mce(hidden, weight, labels, target_weights)`` equals
``single_kernel_mce(ColumnParallelLinear(hidden), labels, target_weights)`` but never holds the
N x V/tp logits: they are computed one row block at a time (``block_rows`` positions x this rank's
vocabulary shard) and dropped. As Liger-Kernel's fused linear cross-entropy, the forward also
computes the gradients while the block is at hand: row max, sum-exp and the s target logits
(under TP one all-gather of the block's (rows, s+2) statistics, ``loss_kernels.combine_stats``),
the loss, then the block turned in place into its logit gradient G (the kernel of
``single_kernel_mce``), grad_hidden rows = G W and grad_weight += G^T h, at a unit upstream
gradient. Three output GEMMs, as the unfused layer. The per-position upstream gradient g only
arrives in backward: grad_hidden scales row-wise (exact for any g); grad_weight = sum_j g_j G_j^T h_j
scales by one factor when g is the same on every position with a loss weight (megatron's loss,
sum(losses * mask) / tokens; positions without weight have G = 0). Backward checks that (one host
sync) and otherwise recomputes the weight gradient tile by tile from the saved statistics: any g
is exact. Held from forward to backward: the V/tp x H weight gradient and the N x H hidden-state
gradient (fp32 for bf16 weights); at the peak one block of logits besides, instead of all the
logits and their fp32 copy. With megatron-core's DDP the weight gradient goes straight into
``main_grad`` (``_into_main_grad``).

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
    _row_blocks,
    _run,
    _work_dtype,
    combine_stats,
    default_compile,
    loss_and_shares,
    shard_targets,
    write_logits_grad,
)

# logits per block (block_rows = this // (V/tp)): larger blocks keep the GEMMs efficient and pass
# over the weight-gradient accumulator fewer times (CPU, V = 32768: 512 rows 1.03x the unfused
# time, 128 rows 1.14x; GPU: M >= 512 at V = 128256), smaller ones hold less (one block at a time)
BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}
# backward: vocabulary rows per weight-gradient tile (its fp32 accumulator: tile x H, for bf16 weights)
VOCAB_TILE = {"cpu": 2048, "cuda": 8192}


def _blocks(rows, block_rows):
    return [(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]


class _LinearMCE(torch.autograd.Function):
    """Forward computes the loss and, when a gradient is wanted, the gradients too (Liger's order):
    per row block, logits -> statistics (under TP one all-gather of the block's (rows, s+2)) -> the
    logit gradient G in place -> grad_hidden rows = G W and grad_weight += G^T h, all at a unit
    upstream gradient. Backward scales: grad_hidden row-wise by grad_output (exact for any
    upstream), grad_weight by the one factor c that grad_output takes on every position with a
    non-zero loss weight (megatron's loss: sum(losses * mask) / tokens, so it is uniform there;
    positions without weight have G = 0). Any other upstream gradient recomputes the weight
    gradient from the saved statistics (two GEMMs per tile), never a wrong result."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, tp_group, block_rows, vocab_tile, compile,
                accumulate_main_grad, main_grad_in_forward, with_grad):
        rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
        vocab = weight.shape[0]
        h2d = hidden.reshape(-1, hidden.shape[-1])
        targets2d = targets.reshape(-1, targets.shape[-1])
        weights2d = target_weights.reshape(targets2d.shape)
        local_targets, off_shard = shard_targets(targets2d, rank * vocab, vocab)
        work = _work_dtype(hidden.dtype)
        rows = h2d.shape[0]
        loss = torch.empty(rows, dtype=work, device=hidden.device)
        lse, total = torch.empty_like(loss), torch.empty_like(loss)
        local_shares = torch.empty(targets2d.shape, dtype=work, device=hidden.device)
        main_grad = weight.main_grad if with_grad and accumulate_main_grad and hasattr(weight, "main_grad") else None
        # an fp32 main_grad can take the forward's weight gradient directly (no V x H buffer), at
        # upstream gradient 1: what megatron's schedule gives with calculate_per_token_loss (bf16
        # and fp32: no loss scale); backward adds (g - 1) times it for any other g (exact, but
        # rounding grows as 1/g for g << 1: hence only where the caller expects 1)
        direct = main_grad_in_forward and main_grad is not None and main_grad.dtype == work
        if with_grad:
            grad_hidden = torch.empty(h2d.shape, dtype=work, device=hidden.device)
            grad_weight = main_grad if direct else torch.zeros(weight.shape, dtype=work, device=weight.device)
        for start, end in _blocks(rows, block_rows):
            logits = torch.matmul(h2d[start:end], weight.t())  # the output layer's GEMM, one block
            row_max, sum_exp = _block_stats(logits, compile)
            block_targets, block_off = local_targets[start:end], off_shard[start:end]
            predicted = logits.gather(-1, block_targets).to(work).masked_fill_(block_off, 0.0)
            lse[start:end], predicted = combine_stats(row_max, sum_exp, predicted, tp_group)
            loss[start:end], total[start:end], shares = loss_and_shares(
                lse[start:end], predicted, targets2d[start:end], weights2d[start:end])
            local_shares[start:end] = shares.masked_fill_(block_off, 0.0)
            if not with_grad:
                continue
            grad_logits = write_logits_grad(logits, lse[start:end], total[start:end], block_targets,
                                            local_shares[start:end], compile)
            torch.matmul(grad_logits, weight, out=grad_hidden[start:end]) if work == weight.dtype else \
                grad_hidden[start:end].copy_(torch.matmul(grad_logits, weight))
            _accumulate_weight_grad(grad_weight, grad_logits, h2d[start:end], vocab_tile)
            del logits, grad_logits
        if with_grad:
            ctx.save_for_backward(hidden, weight, lse, total, local_targets, local_shares)
            ctx.grad_hidden, ctx.grad_weight = grad_hidden, None if direct else grad_weight
            ctx.block_rows, ctx.vocab_tile, ctx.compile = block_rows, vocab_tile, compile
            # megatron-core's ColumnParallelLinear keeps main_grad in ctx too (not saved: shared weights)
            ctx.main_grad, ctx.direct = main_grad, direct
        return loss.reshape(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, lse, total, local_targets, local_shares = ctx.saved_tensors
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        upstream = grad_output.reshape(-1).to(lse.dtype)
        grad_hidden.mul_(upstream.unsqueeze(-1))
        weighted = total > 0
        # the upstream gradient's range over the weighted positions: one host sync (a GPU waits here once)
        high = torch.where(weighted, upstream, -torch.inf).amax()
        low = torch.where(weighted, upstream, torch.inf).amin()
        high, low = torch.stack([high, low]).tolist()
        grad_hidden = grad_hidden.to(hidden.dtype).reshape(hidden.shape)
        if ctx.direct:  # main_grad holds the gradient at upstream 1: add (g - 1) times it if g is not 1
            if not (high == low == 1.0 or high == -torch.inf):
                ctx.main_grad.add_(_recomputed_weight_grad(hidden, weight, lse, (upstream - 1.0) * total,
                                                           local_targets, local_shares, ctx.block_rows,
                                                           ctx.vocab_tile, ctx.compile))
            return grad_hidden, _into_main_grad(weight, ctx.main_grad, None), *(None,) * 9
        if high == low or high == -torch.inf:  # uniform (or no weighted position: G = 0)
            grad_weight.mul_(0.0 if high == -torch.inf else high)
        else:
            grad_weight = _recomputed_weight_grad(hidden, weight, lse, upstream * total, local_targets,
                                                  local_shares, ctx.block_rows, ctx.vocab_tile, ctx.compile)
        if ctx.main_grad is not None:
            return grad_hidden, _into_main_grad(weight, ctx.main_grad, grad_weight), *(None,) * 9
        return grad_hidden, grad_weight.to(weight.dtype), *(None,) * 9


def _block_stats(logits, compile):
    """Row max and sum-exp of a block, in the eager sub-blocks that bound the kernel's temporaries."""
    work = _work_dtype(logits.dtype)
    row_max = torch.empty(logits.shape[0], dtype=work, device=logits.device)
    sum_exp = torch.empty_like(row_max)
    for start, end in _row_blocks(*logits.shape, compile):
        row_max[start:end], sum_exp[start:end] = _run("stats", compile, logits[start:end])
    return row_max, sum_exp


def _accumulate_weight_grad(grad_weight, grad_logits, rows, vocab_tile):
    """grad_weight (work dtype) += grad_logits^T rows; bf16 GEMMs added to the fp32 sum one
    vocabulary tile at a time (a tile x H temporary, not V x H)."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), rows)
        return
    for v0 in range(0, grad_weight.shape[0], vocab_tile):
        grad_weight[v0:v0 + vocab_tile] += torch.matmul(grad_logits[:, v0:v0 + vocab_tile].t(), rows)


def _recomputed_weight_grad(hidden, weight, lse, scale, local_targets, local_shares, block_rows, vocab_tile,
                            compile):
    """The weight gradient for a non-uniform upstream gradient: logits recomputed tile by tile
    (vocabulary tiles outside, row blocks inside), each turned in place into its gradient."""
    h2d = hidden.reshape(-1, hidden.shape[-1])
    grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
    for v0 in range(0, weight.shape[0], vocab_tile):
        tile_weight = weight[v0:v0 + vocab_tile]
        shifted = local_targets - v0
        off_tile = (shifted < 0) | (shifted >= tile_weight.shape[0])
        tile_targets, tile_shares = shifted.masked_fill(off_tile, 0), local_shares.masked_fill(off_tile, 0.0)
        for start, end in _blocks(h2d.shape[0], block_rows):
            logits = torch.matmul(h2d[start:end], tile_weight.t())
            grad_logits = write_logits_grad(logits, lse[start:end], scale[start:end], tile_targets[start:end],
                                            tile_shares[start:end], compile)
            _accumulate_weight_grad(grad_weight[v0:v0 + vocab_tile], grad_logits, h2d[start:end], vocab_tile)
    return grad_weight


def _into_main_grad(weight, main_grad, grad_weight):
    """megatron-core's gradient_accumulation_fusion contract (LinearWithGradAccumulationAndAsync-
    Communication): add into main_grad, mark ``grad_added_to_main_grad`` so DDP's hook does not add
    again, and hand autograd a dummy gradient (zeros where ``zero_out_wgrad`` asks for them: a tied
    embedding table, whose other use's gradient is added to it and then taken by DDP's hook)."""
    if grad_weight is not None:
        main_grad.add_(grad_weight)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(main_grad.shape, dtype=weight.dtype, device=weight.device)


def fused_linear_mce(hidden, weight, labels, target_weights, tp_group=None, sequence_parallel=False,
                     block_rows=None, vocab_tile=None, compile=None, check_labels=False, accumulate_main_grad=True,
                     main_grad_in_forward=False):
    """Per-position MCE of the column-parallel output layer ``hidden @ weight.T``, logits never stored.

    hidden [L(/tp with ``sequence_parallel``), b, H]; weight (V/tp, H), this rank's vocabulary
    shard (the output layer's weight, or the embedding table when tied); labels and target_weights
    [L, b, s] over the full sequence (global token ids, negative for ignored). Returns fp32 (fp64
    for fp64 inputs) losses [L, b]. ``block_rows``: positions per block (default: BLOCK_ELEMENTS
    logits per block); ``vocab_tile``: vocabulary rows per backward tile (default VOCAB_TILE);
    ``compile``: as ``single_kernel_mce``. ``accumulate_main_grad``: where the weight has a
    ``main_grad`` (megatron-core's DDP), add its gradient there (see ``_into_main_grad``); an fp32
    main_grad receives it during the forward with ``main_grad_in_forward`` (for callers whose
    upstream gradient is 1, megatron's ``calculate_per_token_loss``: no V x H buffer from forward to
    backward), so such a forward with gradients on must be followed by its backward (as megatron's
    schedule does; evaluation runs without gradients).
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
                            int(vocab_tile), compile, accumulate_main_grad, main_grad_in_forward,
                            torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))


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
                                tp_group=self.tp_group, sequence_parallel=self.sequence_parallel,
                                main_grad_in_forward=self.config.calculate_per_token_loss)
