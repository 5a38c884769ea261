"""Pretraining entry: ``torchrun ... -m megatron_tst.pretrain <Megatron-LM flags> [--tst-bag-size s --tst-ratio r]``.

One run covers both TST phases over one WSD schedule of --train-iters steps: superposition (bags of
s tokens, multi-hot CE) for the first r of the steps, then next-token recovery from the same
weights, optimizer and schedule, on data phase 1 never read. ``--exit-at-phase-switch`` saves and
stops at the switch instead (the two-phase launcher then converts the checkpoint and starts the
recovery job in fresh processes). Without TST flags it is the matched baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from functools import partial

import megatron_tst  # noqa: F401  (first: prepares torch when CUDA is absent)

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_tst import checkpointing, parallel
from megatron_tst.arguments import PretrainConfig, parse_args, wsd_decay_iters
from megatron_tst.data import DataConfig, TSTData
from megatron_tst.metrics import MetricsLogger, model_flops_per_position
from megatron_tst.models import build_gpt_model, padded_vocab_size, transformer_config
from megatron_tst.tst import SUPERPOSITION, TSTPlan, num_valid_targets


class TrainingStopped(RuntimeError):
    pass


def build_model(config: PretrainConfig, arch, plan: TSTPlan | None):
    par = config.parallel
    model_config = transformer_config(
        arch,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        bf16=config.model.bf16,
        transformer_impl=config.model.transformer_impl,
        fp8_format=config.model.fp8_format,
        fp8_recipe=config.model.fp8_recipe,
        moe_token_dispatcher_type=config.model.moe_token_dispatcher_type,
        calculate_per_token_loss=True,  # exact token means across micro-batches and data-parallel ranks
    )
    chunks = []
    for stage in range(par.virtual_pipeline_model_parallel_size or 1):
        vp_stage = stage if par.virtual_pipeline_model_parallel_size else None
        chunks.append(build_gpt_model(
            arch, model_config,
            tst=plan is not None,  # without TST flags (baseline, recovery job) a plain GPTModel
            loss_weighting=plan.loss_weighting if plan else "uniform",
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, seq_length=config.model.seq_length,
        ))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=par.use_distributed_optimizer,
    )
    chunks = [DistributedDataParallel(model_config, ddp_config, chunk) for chunk in chunks]
    return chunks, model_config


def build_optimizer(config: PretrainConfig, chunks, model_config):
    training = config.training
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=training.lr, min_lr=training.min_lr, weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1, adam_beta2=training.adam_beta2, adam_eps=training.adam_eps,
        clip_grad=training.clip_grad, bf16=config.model.bf16, params_dtype=model_config.params_dtype,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    ), chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=training.lr, min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters,
        lr_decay_steps=training.lr_decay_iters or training.train_iters,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay, end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters, wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_iters(training), lr_wsd_decay_style=training.lr_wsd_decay_style,
    )
    return optimizer, scheduler


def loss_func(labels, output_tensor):
    """Megatron's loss contract with calculate_per_token_loss: (sum, token count, report)."""
    losses = output_tensor
    if labels.dim() == losses.dim():  # next-token labels: megatron-core's CE leaves ignored ones in
        losses = losses * (labels >= 0)
    total = losses.sum()
    count = num_valid_targets(labels).to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach().float(), count.float()])}


def forward_step(data_iterator, model):
    # samples arrive folded (b, L, s); context parallelism takes this rank's two chunks of latent
    # positions, so a bag and its next-bag targets are never split
    batch = get_batch_on_this_cp_rank(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["labels"])


def run_step(chunks, data_iterators, num_microbatches, config: PretrainConfig, forward_only=False):
    """One global batch through megatron-core's schedule; returns (loss sum, token count)."""
    iterator = data_iterators if len(chunks) > 1 else data_iterators[0]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=config.model.seq_length,
        micro_batch_size=config.training.micro_batch_size, forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64)
    for report in reports:  # only the last pipeline stage has reports
        totals += report["lm loss"].double()
    if dist.is_initialized():  # sum over data-parallel ranks, then share with every pipeline stage
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals[0].item(), totals[1].item()


class StopFlags:
    """SIGTERM / Ctrl-C ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def tokenizer_info(config: PretrainConfig):
    data = config.data
    if data.tokenizer_type in (None, "NullTokenizer"):
        vocab = config.model.vocab_size or (config.model.model_preset and config.model.architecture().vocab_size)
        if not vocab:
            raise ValueError("NullTokenizer needs --vocab-size (or a --model-preset)")
        return vocab, vocab - 1
    from megatron_tst.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(data.tokenizer_type, data.tokenizer_model)
    return tokenizer.vocab_size, tokenizer.eod


def data_state_matches(saved: dict, current: dict) -> str | None:
    """The data plan of a resumed run must be the one the checkpoint was made with."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            return f"{key} is {value!r} but the checkpoint was made with {saved[key]!r}"
    return None


def pretrain(config: PretrainConfig) -> dict:
    training, par, ckpt = config.training, config.parallel, config.checkpoint
    parallel.initialize(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        context_parallel_size=par.context_parallel_size, seed=training.seed,
    )
    dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=False)
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=False)
    global_batch = training.global_batch_size or training.micro_batch_size * dp_size
    if global_batch % (training.micro_batch_size * dp_size):
        raise ValueError(f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
                         f"{training.micro_batch_size} x data-parallel size {dp_size}")
    num_microbatches = global_batch // (training.micro_batch_size * dp_size)

    plan = config.tst.plan(training.train_iters)
    vocab_size, eod = tokenizer_info(config)
    arch = dataclasses.replace(config.model.architecture(), vocab_size=config.model.vocab_size or vocab_size)
    chunks, model_config = build_model(config, arch, plan)
    optimizer, scheduler = build_optimizer(config, chunks, model_config)
    model_config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads

    def data_identity(data_plan):
        return dict(data_path=list(config.data.data_path), split=config.data.split, seed=training.seed,
                    seq_length=config.model.seq_length, global_batch_size=global_batch,
                    train_iters=training.train_iters,
                    tst=dict(bag_size=data_plan.bag_size, switch_iter=data_plan.switch_iter,
                             total_iters=data_plan.total_iters, mode=data_plan.mode) if data_plan else None)

    is_logger = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
    metrics = MetricsLogger(ckpt.save, config.logging.tensorboard_dir, enabled=is_logger)
    modules = [chunk.module for chunk in chunks]  # checkpoints hold the bare model's keys
    iteration, consumed, data_plan = 0, {}, plan
    load_root = ckpt.load
    if ckpt.save and checkpointing.latest_iteration(ckpt.save) is not None:
        load_root = ckpt.save  # the same command resumes from its own newest checkpoint
    if load_root:
        saved = checkpointing.read_run_config(load_root)
        if saved.get("model") is not None and saved["model"] != dataclasses.asdict(arch):
            raise checkpointing.CheckpointError(
                f"{load_root} holds a model of another shape ({_shape_difference(saved['model'], dataclasses.asdict(arch))})")
        state = checkpointing.load(load_root, modules, optimizer, scheduler,
                                   load_optimizer=not saved.get("reset_optimizer", False))
        common = state["common"]
        saved_tst = common["data_identity"]["tst"]
        if plan is None and saved_tst is not None and common["tst_state"] is None:
            # a converted phase-1 checkpoint: recovery keeps reading the data TST planned for it
            data_plan = TSTPlan(bag_size=saved_tst["bag_size"], total_iters=saved_tst["total_iters"],
                                switch_iter=saved_tst["switch_iter"], mode=saved_tst["mode"])
        mismatch = data_state_matches(common["data_identity"], data_identity(data_plan))
        if mismatch:
            raise checkpointing.CheckpointError(f"cannot resume from {load_root}: {mismatch}")
        iteration, consumed = state["iteration"], dict(common["consumed_samples"])
        metrics.restore(common["metrics"], iteration)
        if common.get("reinit_embeddings"):
            reinitialise_embeddings(modules, optimizer)

    data = TSTData(DataConfig(
        data_path=config.data.data_path, seq_length=config.model.seq_length, global_batch_size=global_batch,
        vocab_size=vocab_size, eod=eod, split=config.data.split, seed=training.seed,
        eod_mask_loss=config.data.eod_mask_loss, allow_repetition=config.data.allow_data_repetition,
        cache_dir=config.data.data_cache_path,
    ), data_plan, total_iters=training.train_iters)
    if iteration == 0 and is_logger:
        for row in data.report():
            print(f"data: {row['phase']:13s} {row['dataset']}: {row['documents']:,} documents, "
                  f"{row['tokens_available']:,} tokens available, {row['tokens_planned']:,} planned, "
                  f"{row['epochs']} epoch(s)", flush=True)

    run_config = dict(model=dataclasses.asdict(arch), tst=dataclasses.asdict(plan) if plan else None,
                      parallel=checkpointing.model_parallel_layout(), padded_vocab_size=padded_vocab_size(
                          arch.vocab_size, par.tensor_model_parallel_size))

    def save(at_iteration):
        if ckpt.save:
            common = dict(consumed_samples=dict(consumed), data_identity=data_identity(data_plan),
                          metrics=metrics.totals(),
                          tst_state=dict(plan=dataclasses.asdict(plan), switch_iter=plan.switch_iter,
                                         phase=data.phase_of(at_iteration)) if plan else None)
            checkpointing.save(ckpt.save, at_iteration, modules, optimizer, scheduler, common, run_config)

    flops_per_position = model_flops_per_position(arch, config.model.seq_length)
    stop = StopFlags()
    iterators, iterator_phase = None, None
    for chunk in chunks:
        chunk.train()
    while iteration < training.train_iters:
        phase = data.phase_of(iteration)
        if phase != iterator_phase:
            if plan is not None and phase != SUPERPOSITION and ckpt.exit_at_phase_switch:
                save(iteration)
                return {"iteration": iteration, "stopped": "phase switch"}
            iterators = [data.micro_batches(phase, consumed.get(phase, 0), training.micro_batch_size,
                                            dp_rank, dp_size) for _ in chunks]
            iterator_phase = phase
        started = time.time()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        loss_sum, tokens = run_step(chunks, iterators, num_microbatches, config)
        succeeded, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        iteration += 1
        consumed[phase] = consumed.get(phase, 0) + global_batch
        loss = loss_sum / max(tokens, 1)
        if not math.isfinite(loss):
            raise TrainingStopped(f"loss is {loss} at iteration {iteration} ({phase} phase); stopping "
                                  "without saving. Lower --lr or check the data, then resume from the last checkpoint")
        metrics.step(iteration=iteration, phase=phase, loss=loss, bag_size=plan.bag_size if plan else 1,
                     lr=scheduler.get_lr(optimizer.param_groups[0]), grad_norm=grad_norm,
                     raw_tokens=global_batch * (data.sample_length[phase] - 1),
                     positions=global_batch * config.model.seq_length,
                     flops=3 * flops_per_position * global_batch * config.model.seq_length,
                     step_time=time.time() - started, peak_flops=config.logging.peak_flops,
                     world_size=dist.get_world_size() if dist.is_initialized() else 1,
                     log=iteration % config.logging.log_interval == 0 or iteration == training.train_iters)
        if config.logging.eval_interval and (iteration % config.logging.eval_interval == 0
                                             or iteration == training.train_iters):
            metrics.validation(iteration, phase, evaluate(chunks, data, config, dp_rank, dp_size))
        exit_now = bool(ckpt.exit_interval) and iteration % ckpt.exit_interval == 0
        if stop.agreed() or exit_now:
            save(iteration)
            metrics.close()
            return {"iteration": iteration, "stopped": "exit interval" if exit_now else "signal",
                    "history": metrics.history}
        if ckpt.save_interval and iteration % ckpt.save_interval == 0:
            save(iteration)
    if ckpt.save and checkpointing.latest_iteration(ckpt.save) != iteration:
        save(iteration)
    metrics.close()
    return {"iteration": iteration, "stopped": None, "history": metrics.history}


def reinitialise_embeddings(modules, optimizer) -> None:
    """The paper's Table 2 ablation: fresh input embedding and output head at the switch."""
    with torch.no_grad(), tensor_parallel.get_cuda_rng_tracker().fork():  # distinct per TP shard
        for module in modules:
            if hasattr(module, "embedding"):
                module.config.embedding_init_method(module.embedding.word_embeddings.weight)
            if getattr(module, "post_process", False) and not module.share_embeddings_and_output_weights:
                module.config.init_method(module.output_layer.weight)
    optimizer.reload_model_params()  # the optimizer's fp32 main copies follow the new weights


def evaluate(chunks, data: TSTData, config: PretrainConfig, dp_rank: int, dp_size: int) -> float | None:
    """Next-token loss on the first --eval-iters micro-batches of the validation split (the same
    samples at every evaluation, in both phases)."""
    if data.valid is None:
        return None
    mbs = config.training.micro_batch_size
    available = len(data.valid) // (mbs * dp_size)
    iters = min(config.logging.eval_iters, available)
    if iters == 0:
        return None
    for chunk in chunks:
        chunk.eval()

    def valid_batches():
        for step in range(iters):
            start = (step * dp_size + dp_rank) * mbs
            samples = [data.valid_sample(i) for i in range(start, start + mbs)]
            yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    with torch.no_grad():
        loss_sum, tokens = run_step(chunks, [valid_batches() for _ in chunks], iters, config, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return loss_sum / max(tokens, 1)


def _shape_difference(saved: dict, current: dict) -> str:
    return ", ".join(f"{k}: checkpoint {saved.get(k)} vs run {current.get(k)}"
                     for k in current if saved.get(k) != current.get(k))


def main(argv=None) -> int:
    try:
        config = parse_args(argv)
        result = pretrain(config)
    except (ValueError, FileNotFoundError, TrainingStopped) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        parallel.shutdown()
        return 1
    parallel.shutdown()
    if result.get("stopped") == "phase switch":
        print(f"phase 1 done: saved at the switch iteration {result['iteration']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
