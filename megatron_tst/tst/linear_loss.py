"""The fused output layer + MCE: hidden states and the output weight in, per-position losses out.

``fused_linear_mce(hidden, weight, labels, target_weights)`` equals
``single_kernel_mce(ColumnParallelLinear(hidden), labels, target_weights)`` but never holds the
N x V/tp logits: they are computed one row block at a time (``block_rows`` positions x this rank's
vocabulary shard), reduced into the row max, sum-exp and the s target logits, and dropped. Under
TP one all-gather of (N, s+2) statistics per call (``loss_kernels.vocab_parallel_stats``).
Backward recomputes each block's logits, turns them in place into the logit gradient (the same
kernel as ``single_kernel_mce``) and accumulates grad_hidden = G W and grad_weight += G^T h.
That is one output GEMM more than the unfused layer (4 instead of 3) for a peak of one block of
logits instead of all of them.

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

BLOCK_ELEMENTS = 1 << 22  # logits per row block (block_rows = this // (V/tp)): 8 MiB in bf16


def _blocks(rows, block_rows):
    return [(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]


class _LinearMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, tp_group, block_rows, compile):
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
        ctx.block_rows, ctx.compile = block_rows, compile
        return loss.reshape(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, lse, total, local_targets, local_shares = ctx.saved_tensors
        h2d = hidden.reshape(-1, hidden.shape[-1])
        scale = grad_output.reshape(-1).to(lse.dtype) * total
        grad_hidden = torch.empty_like(h2d)
        # accumulated in fp32 over the blocks (each block's bf16 GEMM rounds its own partial sum once)
        grad_weight = torch.zeros(weight.shape, dtype=_work_dtype(weight.dtype), device=weight.device)
        for start, end in _blocks(h2d.shape[0], ctx.block_rows):
            logits = torch.matmul(h2d[start:end], weight.t())
            grad_logits = write_logits_grad(logits, lse[start:end], scale[start:end],
                                            local_targets[start:end], local_shares[start:end], ctx.compile)
            torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
            if grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.t(), h2d[start:end])
            else:
                grad_weight += torch.matmul(grad_logits.t(), h2d[start:end])
        return grad_hidden.reshape(hidden.shape), grad_weight.to(weight.dtype), None, None, None, None, None


def fused_linear_mce(hidden, weight, labels, target_weights, tp_group=None, sequence_parallel=False,
                     block_rows=None, compile=None, check_labels=False):
    """Per-position MCE of the column-parallel output layer ``hidden @ weight.T``, logits never stored.

    hidden [L(/tp with ``sequence_parallel``), b, H]; weight (V/tp, H), this rank's vocabulary
    shard (the output layer's weight, or the embedding table when tied); labels and target_weights
    [L, b, s] over the full sequence (global token ids, negative for ignored). Returns fp32 (fp64
    for fp64 inputs) losses [L, b]. ``block_rows``: positions per block (default: BLOCK_ELEMENTS
    logits per block); ``compile``: as ``single_kernel_mce``.
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
        block_rows = max(1, BLOCK_ELEMENTS // max(weight.shape[0], 1))
    if compile is None:
        compile = default_compile(hidden.device)
    return _LinearMCE.apply(hidden.contiguous(), weight, labels, target_weights, group, int(block_rows), compile)


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
