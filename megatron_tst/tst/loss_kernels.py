"""The single-kernel MCE: one read of the logits in their own dtype, no fp32 copy of them.

Same API and semantics as ``loss.fused_vocab_parallel_mce`` (per-position losses sum_i t_i CE_i,
ignored targets negative, the vocabulary split over the TP group), computed differently:

- forward: per row, the max and the sum of exp(z - max) over this rank's vocabulary shard (one
  reduction kernel reading the logits in their dtype) and the s target logits (a gather of N x s
  values). Under TP, one all-gather of the (N, s+2) statistics [max, sum-exp, target logits] per
  call; each rank combines them: M = max_r m_r, S = sum_r S_r exp(m_r - M), lse = M + log S.
- backward: recomputes softmax(z) * scale row block by row block and writes it, in the logits'
  dtype, into the logits buffer itself (the buffer becomes the gradient, as megatron-core's CE does
  with fp32 logits); the s target entries are then set by a scatter of N x s exact values (each
  rounded once; repeated tokens in a bag carry the sum of their shares).

The two full-row passes are ``_row_stats`` and ``_write_grad``. With ``compile=True`` they run
through ``torch.compile`` (C++ on CPU, Triton on GPU: nothing N x V is materialised besides the
logits themselves); otherwise their in-place eager twins (``*_eager``, the same arithmetic) run
over row blocks whose fp32 temporaries are bounded by ``EAGER_BLOCK_ELEMENTS``. The default compiles on CUDA only: on CPU the
first compilation costs ~20 s per process, more than a short CPU run gains.

The logits buffer is overwritten by its gradient in backward: pass logits nobody reads afterwards
(the output layer's result, as in the model). A tensor that another autograd node saved makes
that node's backward fail loudly (version counter), never silently.
"""

from __future__ import annotations

import functools
import warnings

import torch

from megatron_tst.tst.loss import _tp_group_or_none, check_label_range

EAGER_BLOCK_ELEMENTS = 1 << 22  # rows per eager block = this // V: 16 MiB of fp32 temporaries


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_stats(logits: torch.Tensor):
    """(max, sum exp(z - max)) per row, in fp32 (fp64 for fp64 logits)."""
    z = logits.to(_work_dtype(logits.dtype))
    row_max = z.amax(dim=-1)
    return row_max, torch.exp(z - row_max.unsqueeze(-1)).sum(dim=-1)


def _write_grad(logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> None:
    """logits <- softmax(logits) * scale, in place, rounded once to the logits' dtype."""
    z = logits.to(_work_dtype(logits.dtype))
    logits.copy_((torch.exp(z - lse.unsqueeze(-1)) * scale.unsqueeze(-1)).to(logits.dtype))


def _row_stats_eager(logits: torch.Tensor):
    """``_row_stats`` with one temporary block (eager torch allocates one per operation)."""
    work = logits.to(_work_dtype(logits.dtype), copy=True)
    row_max = work.amax(dim=-1)
    return row_max, work.sub_(row_max.unsqueeze(-1)).exp_().sum(dim=-1)


def _write_grad_eager(logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> None:
    """``_write_grad`` in place (fp32/fp64 logits) or through one fp32 block (bf16/fp16)."""
    work = logits if logits.dtype == _work_dtype(logits.dtype) else logits.float()
    work.sub_(lse.unsqueeze(-1)).exp_().mul_(scale.unsqueeze(-1))
    if work is not logits:
        logits.copy_(work)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile({"stats": _row_stats, "grad": _write_grad}[name], dynamic=True)


_COMPILE_FAILED: list[str] = []


def _run(name: str, compile: bool, *args):
    """The compiled kernel, or the eager one where compilation is unavailable (said once)."""
    eager = {"stats": _row_stats_eager, "grad": _write_grad_eager}[name]
    if compile and not _COMPILE_FAILED:
        try:
            return _compiled(name)(*args)
        except Exception as error:  # no C++ compiler, no Triton: the eager path computes the same
            _COMPILE_FAILED.append(f"{type(error).__name__}: {error}".splitlines()[0])
            warnings.warn(f"torch.compile of the MCE kernel failed ({_COMPILE_FAILED[0]}); using the eager path")
    return eager(*args)


def _row_blocks(rows: int, vocab: int, compile: bool):
    step = rows if compile else max(1, EAGER_BLOCK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def vocab_parallel_stats(logits2d, local_targets, off_shard, tp_group, compile):
    """lse (N,) and target logits (N, s) over the whole vocabulary: the forward's reductions."""
    rows, vocab = logits2d.shape
    work = _work_dtype(logits2d.dtype)
    row_max = torch.empty(rows, dtype=work, device=logits2d.device)
    sum_exp = torch.empty_like(row_max)
    for start, end in _row_blocks(rows, vocab, compile):
        row_max[start:end], sum_exp[start:end] = _run("stats", compile, logits2d[start:end])
    predicted = logits2d.gather(-1, local_targets).to(work).masked_fill_(off_shard, 0.0)
    return combine_stats(row_max, sum_exp, predicted, tp_group)


def combine_stats(row_max, sum_exp, predicted, tp_group):
    """(lse, target logits) over the whole vocabulary from each shard's (max, sum-exp, targets)."""
    world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    if world > 1:  # one collective: every rank's [max, sum-exp, its target logits]
        packed = torch.cat([row_max.unsqueeze(-1), sum_exp.unsqueeze(-1), predicted], dim=-1)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        torch.distributed.all_gather(gathered, packed, group=tp_group)
        stats = torch.stack(gathered)  # (tp, N, s+2)
        row_max = stats[..., 0].amax(dim=0)
        sum_exp = (stats[..., 1] * torch.exp(stats[..., 0] - row_max)).sum(dim=0)
        predicted = stats[..., 2:].sum(dim=0)  # a target's logit lives on exactly one rank
    return row_max + torch.log(sum_exp), predicted


def shard_targets(targets, vocab_start, partition_vocab):
    off_shard = (targets < vocab_start) | (targets >= vocab_start + partition_vocab)
    return (targets - vocab_start).masked_fill(off_shard, 0), off_shard  # masked_fill: no host sync


def loss_and_shares(lse, predicted, targets, target_weights):
    """Per-position losses, total weight per position, and t_i / sum_i t_i (0 where no weight)."""
    weights = target_weights.to(lse.dtype) * (targets >= 0)
    loss = ((lse.unsqueeze(-1) - predicted) * weights).sum(dim=-1)
    total = weights.sum(dim=-1)
    shares = torch.where(total.unsqueeze(-1) > 0, weights / total.unsqueeze(-1), 0.0)
    return loss, total, shares


def target_grad_values(target_logits, lse, scale, local_targets, local_shares):
    """The gradient at the s target entries: (softmax - the summed shares of that token) * scale.

    Slots naming the same column (a repeated token; an ignored or off-shard slot parked at column
    0) all get the same value, so the scatter that writes them is order-independent."""
    same = local_targets.unsqueeze(-1) == local_targets.unsqueeze(-2)  # (N, s, s)
    token_share = (same * local_shares.unsqueeze(-2)).sum(dim=-1)
    return (torch.exp(target_logits - lse.unsqueeze(-1)) - token_share) * scale.unsqueeze(-1)


def write_logits_grad(logits2d, lse, scale, local_targets, local_shares, compile):
    """logits2d <- d loss / d logits (scale = grad_output * total weight per row), in place."""
    rows, vocab = logits2d.shape
    target_logits = logits2d.gather(-1, local_targets).to(lse.dtype)  # before the overwrite
    for start, end in _row_blocks(rows, vocab, compile):
        _run("grad", compile, logits2d[start:end], lse[start:end], scale[start:end])
    values = target_grad_values(target_logits, lse, scale, local_targets, local_shares)
    logits2d.scatter_(-1, local_targets, values.to(logits2d.dtype))
    return logits2d


class _SingleKernelMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, target_weights, tp_group, compile, inplace):
        rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
        vocab = logits.shape[-1]
        logits2d = logits.reshape(-1, vocab)
        targets2d = targets.reshape(-1, targets.shape[-1])
        local_targets, off_shard = shard_targets(targets2d, rank * vocab, vocab)
        lse, predicted = vocab_parallel_stats(logits2d, local_targets, off_shard, tp_group, compile)
        loss, total, shares = loss_and_shares(lse, predicted, targets2d, target_weights.reshape(targets2d.shape))
        ctx.save_for_backward(logits, lse, total, local_targets, shares * ~off_shard)
        ctx.compile = compile
        ctx.inplace = inplace
        return loss.reshape(logits.shape[:-1]).to(_work_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        logits, lse, total, local_targets, local_shares = ctx.saved_tensors
        if not ctx.inplace:
            logits = logits.clone()
        scale = grad_output.reshape(-1).to(lse.dtype) * total
        logits2d = logits.reshape(-1, logits.shape[-1])
        write_logits_grad(logits2d, lse, scale, local_targets, local_shares, ctx.compile)
        return logits, None, None, None, None, None


# next-token (s = 1) losses through single_kernel_mce instead of megatron-core's
# vocab_parallel_cross_entropy, per device type, where it is the faster (BENCHMARKS.md, "CPU: the
# loss kernels"): on CUDA compiled (Triton: one read of the logits, no fp32 copy); on CPU its eager
# default only ties megatron-core's CE, so megatron-core's stays. --cross-entropy-loss-fusion
# (megatron-core's fused CE) takes precedence wherever it is asked for.
NEXT_TOKEN_SINGLE_KERNEL = {"cuda": True, "cpu": False}


def next_token_uses_single_kernel(device: torch.device) -> bool:
    return NEXT_TOKEN_SINGLE_KERNEL.get(device.type, False)


def default_compile(device: torch.device) -> bool:
    """Compile on CUDA; on CPU the eager blocks (see the module docstring)."""
    return device.type == "cuda"


def single_kernel_mce(logits, labels, target_weights, tp_group=None, compile: bool | None = None,
                      check_labels: bool = False, inplace_backward: bool | None = None):
    """Per-position MCE sum_i t_i CE(z, y_i), vocabulary split over ``tp_group``: the arguments and
    result of ``fused_vocab_parallel_mce``. The logits buffer becomes its own gradient in backward.
    ``compile``: torch.compile the two full-row passes (default: on CUDA only). Labels beyond the
    vocabulary are refused where that costs no device sync (CPU labels) or with ``check_labels``;
    unchecked, such a target counts as off every shard (never an out-of-bounds read).
    ``inplace_backward``: write the gradient into the logits buffer; default: unless the logits are
    a leaf tensor or a view of one (the caller's own data), which get a copy instead."""
    if labels.shape != target_weights.shape or labels.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and target weights {tuple(target_weights.shape)} must "
            f"both be (..., s) over the logits' leading dimensions {tuple(logits.shape[:-1])}"
        )
    group = _tp_group_or_none(tp_group)
    if check_labels or labels.device.type == "cpu":
        check_label_range(labels, logits.shape[-1] * (1 if group is None else torch.distributed.get_world_size(group)))
    if compile is None:
        compile = default_compile(logits.device)
    if not logits.is_contiguous():
        logits = logits.contiguous()
    if inplace_backward is None:
        inplace_backward = not (logits if logits._base is None else logits._base).is_leaf
    return _SingleKernelMCE.apply(logits, labels, target_weights, group, compile, inplace_backward)
