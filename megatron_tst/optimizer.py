"""megatron-core's optimizer without Transformer Engine or Apex, made fast: torch's fused AdamW and a
gradient norm without a host synchronisation per tensor.

Without TE/Apex, megatron-core 0.16.1 builds ``torch.optim.AdamW`` with torch's defaults (the
multi-tensor "foreach" kernels on CUDA, a per-tensor loop on CPU) and computes the gradient norm
with ``local_multi_tensor_l2_norm``, which turns every tensor's norm into a Python float (a host
synchronisation per parameter tensor). Here, by extension only:

- ``use_fused_adamw``: every torch Adam/AdamW param group inside the megatron optimizer runs
  ``fused=True`` (one kernel for the whole update, CUDA and CPU); a ``load_state_dict`` post-hook
  (torch's own hook) keeps it fused after a checkpoint load, whatever the checkpoint's groups say.
  The distributed optimizer copies loaded state into the existing tensors, so it stays as built.
- ``ForeachNormChainedOptimizer``: megatron-core's ``ChainedOptimizer`` (what
  ``get_megatron_optimizer`` returns) with ``get_grad_norm`` computed by ``torch._foreach_norm``:
  one all-reduce per inner optimizer's group and one host read per step (megatron-core returns
  the norm as a float, and its step clips on the host's value). Clipping multiplies the gradients
  in place with one ``torch._foreach_mul_`` per inner optimizer: megatron-core's fallback without
  Apex (``local_multi_tensor_scale``) writes a scaled copy of every gradient and copies it back,
  twice the memory traffic and a temporary the size of the largest gradient (the embedding's).
- ``mark_decoupled_groups``: --decoupled-lr's param groups resume with their own LR (below).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.utils import to_local_if_dtensor


def mark_decoupled_groups(optimizer_or_state) -> None:
    """megatron-core 0.16.1 leaves ``is_decoupled_lr`` False on --decoupled-lr's param groups, yet its
    checkpoint loader pairs saved and current groups by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr) alone: on resume the embedding/output group and the default one collide (the
    plain optimizer fails to load, the distributed one silently gives every weight the decoupled LR;
    Megatron-LM core_v0.16.1 does the same, fixed upstream later, NVIDIA/Megatron-LM#4705). The groups
    with an LR of their own (``default_config`` False: only --decoupled-lr's here) get the flag: an
    optimizer's, and a loaded state dict's (so checkpoints saved without the flag load too)."""
    if hasattr(optimizer_or_state, "param_groups"):
        groups = optimizer_or_state.param_groups
    else:  # a (nested) optimizer state dict
        groups, stack = [], [optimizer_or_state]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if isinstance(item.get("param_groups"), list):
                    groups += item["param_groups"]
                stack += [v for k, v in item.items() if k not in ("param_groups", "state")]
            elif isinstance(item, (list, tuple)):
                stack += list(item)
    for group in groups:
        if isinstance(group, dict) and not group.get("default_config", True):
            group["is_decoupled_lr"] = True


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW optimizers inside a megatron-core optimizer (chained or not)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    found = [getattr(o, "optimizer", None) for o in inner]
    return [o for o in found if isinstance(o, torch.optim.Adam)]  # AdamW is an Adam in torch >= 2.x


def _fuse(adam: torch.optim.Optimizer) -> None:
    adam.defaults.update(fused=True, foreach=False)
    for group in adam.param_groups:
        group.update(fused=True, foreach=False)
        for param in group["params"]:
            step = adam.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor) and (step.device != param.device or step.dtype != torch.float32):
                # fused kernels read the step count on the parameters' device (torch's own rule)
                adam.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)


def use_fused_adamw(optimizer) -> int:
    """Make every torch Adam(W) inside ``optimizer`` fused, now and after any state load. Returns
    how many it changed (0 with TE/Apex, whose FusedAdam is fused already)."""
    adams = torch_adams(optimizer)
    for adam in adams:
        _fuse(adam)
        if not getattr(adam, "_megatron_tst_fused_hook", False):
            adam.register_load_state_dict_post_hook(_fuse)
            adam._megatron_tst_fused_hook = True
    return len(adams)


def is_fused(optimizer) -> bool:
    adams = torch_adams(optimizer)
    return bool(adams) and all(g.get("fused") for a in adams for g in a.param_groups)


class ForeachNormChainedOptimizer(ChainedOptimizer):
    """``ChainedOptimizer`` whose gradient norm takes one host read per step (see the module doc).
    Same value as megatron-core's: the L2 norm over every inner optimizer's main gradients, each
    part summed over that optimizer's gradient-statistics group."""

    @classmethod
    def wrap(cls, chained: ChainedOptimizer) -> "ForeachNormChainedOptimizer":
        return cls(chained.chained_optimizers)

    @torch.no_grad()
    def get_grad_norm(self):
        total = None
        for optimizer in self.chained_optimizers:
            if getattr(optimizer, "is_stub_optimizer", False):
                continue
            grads = optimizer.get_main_grads_for_grad_norm()
            if grads:
                part = torch.stack(torch._foreach_norm(grads, 2.0)).float().square().sum()
            else:  # a rank without parameters in this optimizer still joins the all-reduce
                part = torch.zeros((), dtype=torch.float32, device=torch.cuda.current_device())
            part = part.reshape(1)
            if dist.is_initialized():
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=optimizer.get_grad_stats_parallel_group())
            total = part if total is None else total + part
        return 0.0 if total is None else math.sqrt(total.item())  # the step's one host read

    @torch.no_grad()
    def step(self):
        """``ChainedOptimizer.step`` (same order: prepare, norm, clip, count zeros, update) with the
        in-place foreach clipping of the module doc."""
        if self.prepare_grads():
            return False, None, None
        grad_norm = self.get_grad_norm()
        for optimizer in self.chained_optimizers:
            if not getattr(optimizer, "is_stub_optimizer", False) and optimizer.config.clip_grad > 0.0:
                clip_by_total_norm(optimizer, grad_norm)
        num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        return self.step_with_ready_grads(), grad_norm, num_zeros


def clip_by_total_norm(optimizer, total_norm: float) -> None:
    """megatron-core's ``clip_grad_by_total_norm_fp32`` for one inner optimizer: the same
    coefficient and the same gradients (``.decoupled_grad`` under the precision-aware optimizer),
    scaled in place."""
    coefficient = optimizer.config.clip_grad / (total_norm + 1.0e-6)
    if coefficient >= 1.0:
        return
    decoupled = optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    grads = [getattr(p, "decoupled_grad", None) if decoupled else p.grad for p in optimizer.get_parameters()]
    grads = [to_local_if_dtensor(g).detach() for g in grads if g is not None]
    if grads:
        torch._foreach_mul_(grads, coefficient)


def fresh_adam_state(optimizer) -> int:
    """Give every parameter without Adam state the state torch's Adam would create at its first step
    (step 0, zero moments), so that a checkpoint saved before any update (fp16: the first steps
    overflow and are skipped) holds the moments megatron-core expects when loading it. The next
    update is the same as from no state. Returns how many parameters got one."""
    count = 0
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                if len(adam.state[param]) == 0:
                    adam.state[param].update(
                        step=torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu"),
                        exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format))
                    count += 1
    return count


def sgd_checkpoints_load(optimizer) -> int:
    """megatron-core 0.16.1 builds SGD (--optimizer sgd) without the ``init_state_fn`` its checkpoint
    loading calls to lay out the state, so loading fails; give each SGD a zero momentum buffer
    there. Loaded state overwrites it; where none was saved (no step yet), torch's first step from
    a zero buffer (dampening 0, megatron-core's) equals its step from none (the gradient).
    Returns how many it set."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    sgds = [o for o in inner if isinstance(getattr(o, "optimizer", None), torch.optim.SGD) and o.init_state_fn is None]
    for megatron_optimizer in sgds:
        megatron_optimizer.init_state_fn = _init_sgd_state
    return len(sgds)


def _init_sgd_state(sgd: torch.optim.SGD, config=None) -> None:
    for group in sgd.param_groups:
        for param in group["params"]:
            if group["momentum"] and sgd.state[param].get("momentum_buffer") is None:
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param.data)
