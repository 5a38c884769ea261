"""Pretraining entry: ``torchrun ... -m megatron_tst.pretrain <Megatron-LM flags> [--tst-bag-size s --tst-ratio r]``.

One run covers both TST phases over one WSD schedule of --train-iters steps: superposition (bags of
s tokens, multi-hot CE) for the first r of the steps, then next-token recovery from the same
weights, optimizer and schedule, on data phase 1 never read. ``--exit-at-phase-switch`` saves and
stops at the switch instead (the two-phase launcher then converts the checkpoint and starts the
recovery job in fresh processes). Without TST flags it is the matched baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
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
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_batch_on_this_cp_rank, unwrap_model

from megatron_tst import checkpointing, device, logging_wandb, megatron_lm_flags, orphan, parallel, preflight, profiling
from megatron_tst.arguments import (
    PretrainConfig, check_environment, fusion_settings, loss_scaling, lr_schedule, model_settings, overlap_settings,
    parse_args,
    resolved_transformer_impl, torch_fusion_settings,
)
from megatron_tst.batch_schedule import BatchSchedule
from megatron_tst.data import DataConfig, TSTData
from megatron_tst.data.tst_datasets import dataset_files_identity, tokenizer_identity
from megatron_tst.metrics import MetricsLogger, model_flops_per_position
from megatron_tst.models import GPTArchitecture, build_gpt_model, padded_vocab_size, transformer_config
from megatron_tst.optimizer import (
    ForeachNormChainedOptimizer, fresh_adam_state, mark_decoupled_groups, sgd_checkpoints_load, use_fused_adamw,
)
from megatron_tst.tst import SUPERPOSITION, TSTPlan, num_valid_targets
from megatron_tst.tst.loss_kernels import next_token_uses_single_kernel


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
        sequence_parallel=par.sequence_parallel_enabled(),
        bf16=config.model.bf16,
        transformer_impl=resolved_transformer_impl(config.model),
        fp8_format=config.model.fp8_format,
        fp8_recipe=config.model.fp8_recipe or "delayed",
        moe_token_dispatcher_type=config.model.moe_token_dispatcher_type,
        attention_backend=config.model.attention_backend,
        calculate_per_token_loss=True,  # exact token means across micro-batches and data-parallel ranks
        **fusion_settings(config, arch), **torch_fusion_settings(config, arch), **model_settings(config),
        **megatron_lm_flags.transformer_settings(config),
    )
    chunks = []
    for stage in range(par.virtual_pipeline_model_parallel_size or 1):
        vp_stage = stage if par.virtual_pipeline_model_parallel_size else None
        chunks.append(build_gpt_model(
            arch, model_config,
            # without TST flags (baseline, recovery job) a plain GPTModel, unless the fused output
            # layer + loss is asked for or the single-kernel CE beats megatron-core's on this device
            # (TSTGPTModel has both; same state dict)
            tst=plan is not None or config.model.output_layer_loss_fusion
            or next_token_uses_single_kernel(device.current()),
            loss_weighting=plan.loss_weighting if plan else "uniform",
            output_layer_loss_fusion=config.model.output_layer_loss_fusion,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, seq_length=config.model.seq_length,
        ))
    for chunk in chunks:
        expert_weights_in_expert_optimizer(chunk)
    overlap = overlap_settings(config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not config.training.grad_reduce_in_bf16, use_distributed_optimizer=par.use_distributed_optimizer, **overlap,
        # with virtual pipeline chunks, Megatron-LM starts the chunks' all-gathers from the schedule
        align_param_gather=overlap["overlap_param_gather"] and len(chunks) > 1,
        **megatron_lm_flags.ddp_settings(config),
    )
    if model_config.bf16 or model_config.fp16:
        # as Megatron-LM's get_model: every parameter in bf16 (torch norms are built in fp32), so the
        # mixed-precision optimizer's fp32 main copies cover all of them and its checkpoint maps each
        # one to a model tensor; inputs cast on the first stage, outputs to fp32 on the last
        chunks = [Float16Module(model_config, chunk) for chunk in chunks]
    chunks = [DistributedDataParallel(model_config, ddp_config, device.module_to_device(chunk)) for chunk in chunks]
    return chunks, model_config


def expert_weights_in_expert_optimizer(chunk):
    """Mark routed-expert weights expert-parallel at EP=1 too. megatron-core puts them in the dense
    optimizer at EP=1 and in a separate expert optimizer at EP>1, so Adam state saved at one EP size
    would not load at the other; at EP=1 the expert data-parallel group is the data-parallel group,
    so only the optimizer's structure changes, not the arithmetic."""
    for name, param in chunk.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def megatron_optimizer(config: PretrainConfig, chunks, model_config):
    """megatron-core's optimizer as get_megatron_optimizer builds it (a ChainedOptimizer)."""
    training = config.training
    optimizer = get_megatron_optimizer(OptimizerConfig(
        **megatron_lm_flags.optimizer_settings(config),  # adam, or sgd with its momentum
        lr=training.lr, min_lr=training.min_lr, weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1, adam_beta2=training.adam_beta2, adam_eps=training.adam_eps,
        clip_grad=training.clip_grad, bf16=config.model.bf16, params_dtype=model_config.params_dtype,
        decoupled_lr=training.decoupled_lr, decoupled_min_lr=training.decoupled_min_lr,
        fp16=config.model.fp16, **(loss_scaling(training) if config.model.fp16 else {}),
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    ), chunks)
    mark_decoupled_groups(optimizer)
    return optimizer


def build_optimizer(config: PretrainConfig, chunks, model_config):
    # torch's fused AdamW and a one-read gradient norm where TE/Apex are absent (megatron_tst/optimizer.py)
    optimizer = ForeachNormChainedOptimizer.wrap(megatron_optimizer(config, chunks, model_config))
    use_fused_adamw(optimizer)
    sgd_checkpoints_load(optimizer)
    return optimizer, build_scheduler(config, optimizer)


def build_scheduler(config: PretrainConfig, optimizer):
    training = config.training
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=training.lr, min_lr=training.min_lr,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay, end_wd=training.weight_decay, wd_incr_style="constant",
        lr_wsd_decay_style=training.lr_wsd_decay_style, **lr_schedule(training)[0],
    )


def one_or_list(functions: list):
    """megatron-core's schedules take one function for one model chunk, a list for several."""
    return functions[0] if len(functions) == 1 else functions


@contextlib.contextmanager
def parameters_in_sync(chunks):
    """With --overlap-param-gather the distributed optimizer leaves the all-gather of updated
    parameters to the next forward's pre-hooks; evaluation and checkpoints need them now. As
    Megatron-LM: hooks off with a synchronous gather, back on afterwards."""
    hooked = [chunk for chunk in chunks if chunk.use_forward_hook]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


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
    batch = get_batch_on_this_cp_rank(device.batch_to_device(next(data_iterator)))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["labels"])


def run_step(chunks, data_iterators, num_microbatches, config: PretrainConfig, forward_only=False):
    """One global batch through megatron-core's schedule; returns (loss sum, token count) as a
    float64 tensor on this rank's device, summed over the job (read it once, with the step's other
    numbers: no host synchronisation here)."""
    iterator = data_iterators if len(chunks) > 1 else data_iterators[0]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=config.model.seq_length,
        micro_batch_size=config.training.micro_batch_size, forward_only=forward_only,
    )
    totals = device.zeros(2, dtype=torch.float64)
    for report in reports:  # only the last pipeline stage has reports
        totals += report["lm loss"].double()
    if dist.is_initialized():  # sum over data-parallel ranks, then share with every pipeline stage
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals


class StopFlags:
    """SIGTERM / Ctrl-C, or the end of --exit-duration-in-mins (counted from ``deadline``'s start, on
    each rank's clock), ask for a checkpoint and a clean exit at the end of the current step."""

    REASONS = ("signal", "exit duration")

    def __init__(self, deadline: float | None = None):
        self.requested = False
        self.deadline = deadline
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> torch.Tensor:
        """Per reason, 1 on every rank when it holds on any rank, as a device tensor (read with the
        step's loss, in the step's one host synchronisation)."""
        time_up = self.deadline is not None and time.time() >= self.deadline
        flags = torch.tensor([float(self.requested), float(time_up)], dtype=torch.float64, device=device.current())
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    @classmethod
    def reason(cls, flags: list[float]) -> str | None:
        return next((why for why, flag in zip(cls.REASONS, flags) if flag), None)


def tokenizer_info(config: PretrainConfig):
    """(vocabulary size, EOD) of the run's tokenizer, as Megatron-LM builds it."""
    from megatron_tst.data.tokenizers import VOCAB_SIZE_TYPES, load_tokenizer

    data, model = config.data, config.model
    kind = data.tokenizer_type or "NullTokenizer"
    size = model.vocab_size
    if kind == "NullTokenizer" and size is None:
        if not model.model_preset:
            raise ValueError("NullTokenizer needs --vocab-size N (ids 0..N-1, EOD N), or a --model-preset")
        size = model.architecture().vocab_size - 1  # the preset's vocabulary, EOD its last id
    tokenizer = load_tokenizer(kind, data.tokenizer_model, vocab_size=size, vocab_file=data.vocab_file,
                               merge_file=data.merge_file, tiktoken_pattern=data.tiktoken_pattern,
                               tiktoken_num_special_tokens=data.tiktoken_num_special_tokens,
                               special_tokens=data.tokenizer_special_tokens or data.tiktoken_special_tokens)
    if model.vocab_size is not None and kind not in VOCAB_SIZE_TYPES and model.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {model.vocab_size} differs from the {kind}'s vocabulary of "
                         f"{tokenizer.vocab_size}; drop --vocab-size (as in Megatron-LM it sizes only "
                         f"{' and '.join(VOCAB_SIZE_TYPES)})")
    return tokenizer.vocab_size, tokenizer.eod


def tiktoken_settings(data) -> dict | None:
    """TikTokenizer's flags that change its ids (a resume must keep them)."""
    if data.tokenizer_type != "TikTokenizer":
        return None
    return dict(pattern=data.tiktoken_pattern, num_special_tokens=data.tiktoken_num_special_tokens or 1000,
                special_tokens=list(data.tokenizer_special_tokens or data.tiktoken_special_tokens))


def data_state_matches(saved: dict, current: dict) -> str | None:
    """The data plan of a resumed run must be the one the checkpoint was made with (fields a
    checkpoint does not record, from an older version, are not compared)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            if isinstance(value, dict) and isinstance(saved[key], dict):  # name the field that differs
                inner = data_state_matches(saved[key], value)
                if inner:
                    return f"{key}.{inner}"
            return f"{key} is {value!r} but the checkpoint was made with {saved[key]!r}"
    return None


@dataclasses.dataclass
class Run:
    """What ``setup`` builds and ``resume`` and ``train`` carry on (Megatron-LM's
    setup_model_and_optimizer / train split)."""

    config: PretrainConfig
    plan: TSTPlan | None
    arch: GPTArchitecture
    chunks: list
    model_config: object
    optimizer: object
    scheduler: object
    metrics: MetricsLogger
    vocab_size: int
    eod: int
    global_batch: int  # after any ramp-up; the step's own: step_batch()
    num_microbatches: int  # of global_batch (a ramp step has its own: step_batch() // (micro x dp))
    dp_rank: int
    dp_size: int
    data_files: dict
    tokenizer: dict
    iteration: int = 0
    consumed: dict = dataclasses.field(default_factory=dict)  # samples read per phase
    data_plan: TSTPlan | None = None  # the plan the data follows (a recovery job keeps phase 1's)
    data: TSTData | None = None
    started: float = dataclasses.field(default_factory=time.time)  # --exit-duration-in-mins counts from here
    profiler: object = None  # --profile (megatron_tst/profiling.py), set by train
    batch_schedule: BatchSchedule | None = None  # --rampup-batch-size

    def step_batch(self) -> int:
        """The next step's global batch size: --global-batch-size, or the ramp's at the samples
        consumed so far (both phases, as Megatron-LM counts them)."""
        if self.batch_schedule is None:
            return self.global_batch
        return self.batch_schedule.at(sum(self.consumed.values()))

    @property
    def modules(self):
        return unwrap_model(self.chunks)  # the bare models (no DDP, no Float16Module): checkpoints hold their keys

    def data_identity(self) -> dict:
        """What a resume must find unchanged: corpus files and tokenizer by content, not by path alone."""
        config, data_plan = self.config, self.data_plan
        return dict(data_path=list(config.data.data_path), mock_data=config.data.mock_data,
                    rampup_batch_size=[int(v) for v in config.training.rampup_batch_size],
                    split=config.data.split, seed=config.training.seed,
                    seq_length=config.model.seq_length, global_batch_size=self.global_batch,
                    train_iters=config.training.train_iters, eod_mask_loss=config.data.eod_mask_loss,
                    data_files=self.data_files, tokenizer=self.tokenizer,
                    tst=dict(bag_size=data_plan.bag_size, switch_iter=data_plan.switch_iter,
                             total_iters=data_plan.total_iters, mode=data_plan.mode,
                             loss_weighting=data_plan.loss_weighting) if data_plan else None)

    def run_config(self) -> dict:
        config, arch = self.config, self.arch
        return dict(model=dataclasses.asdict(arch), tst=dataclasses.asdict(self.plan) if self.plan else None,
                    parallel=checkpointing.model_parallel_layout(), padded_vocab_size=padded_vocab_size(
                        arch.vocab_size, config.parallel.tensor_model_parallel_size, arch.make_vocab_size_divisible_by),
                    tokenizer=dict(type=config.data.tokenizer_type, **{  # for the HF export
                        name: os.path.abspath(path) if path else None for name, path in (
                            ("model", config.data.tokenizer_model), ("vocab_file", config.data.vocab_file),
                            ("merge_file", config.data.merge_file))}))

    def save(self, at_iteration: int) -> None:
        save_dir, plan = self.config.checkpoint.save, self.plan
        if save_dir:
            common = dict(consumed_samples=dict(self.consumed), data_identity=self.data_identity(),
                          metrics=self.metrics.totals(),
                          tst_state=dict(plan=dataclasses.asdict(plan), switch_iter=plan.switch_iter,
                                         phase=self.data.phase_of(at_iteration)) if plan else None)
            if self.config.model.fp16:  # skipped (overflowing) steps may have left Adam without state
                fresh_adam_state(self.optimizer)
            with parameters_in_sync(self.chunks):
                checkpointing.save(save_dir, at_iteration, self.modules, self.optimizer, self.scheduler, common,
                                   self.run_config(), async_save=self.config.checkpoint.async_save,
                                   save_optimizer=not self.config.checkpoint.no_save_optim,
                                   save_rng=not self.config.checkpoint.no_save_rng)


def setup(config: PretrainConfig) -> Run:
    """Process groups, model chunks, optimizer and scheduler, wired for megatron-core's schedules."""
    started = time.time()
    training, par = config.training, config.parallel
    preflight.check(config)  # every rank, before any collective: no rank fails alone later
    parallel.initialize(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        context_parallel_size=par.context_parallel_size, seed=training.seed,
        timeout_minutes=par.distributed_timeout_minutes,
    )
    dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=False)
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=False)
    global_batch = training.global_batch_size or training.micro_batch_size * dp_size
    if global_batch % (training.micro_batch_size * dp_size):
        raise ValueError(f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
                         f"{training.micro_batch_size} x data-parallel size {dp_size}")
    for what, size in zip(("START", "INCR"), training.rampup_batch_size[:2]):  # so is every ramp step's batch
        if int(size) % (training.micro_batch_size * dp_size):
            raise ValueError(f"--rampup-batch-size {what} {size} is not a multiple of --micro-batch-size "
                             f"{training.micro_batch_size} x data-parallel size {dp_size}")

    plan = config.tst.plan(training.train_iters)
    vocab_size, eod = tokenizer_info(config)
    arch = config.model.architecture(vocab_size=vocab_size)
    chunks, model_config = build_model(config, arch, plan)
    optimizer, scheduler = build_optimizer(config, chunks, model_config)
    model_config.no_sync_func = one_or_list([chunk.no_sync for chunk in chunks])
    if chunks[0].ddp_config.overlap_grad_reduce:  # the schedule starts each chunk's reduction (Megatron-LM's align_grad_reduce)
        model_config.grad_sync_func = one_or_list([chunk.start_grad_sync for chunk in chunks])
    if chunks[0].ddp_config.align_param_gather:
        model_config.param_sync_func = one_or_list([chunk.start_param_sync for chunk in chunks])
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads

    is_logger = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
    return Run(config=config, started=started, plan=plan, data_plan=plan, arch=arch, chunks=chunks, model_config=model_config,
               optimizer=optimizer, scheduler=scheduler,
               metrics=MetricsLogger(config.checkpoint.save, config.logging.tensorboard_dir, enabled=is_logger,
                                     throughput=config.logging.log_throughput,
                                     wandb=logging_wandb.open_writer(config, is_logger)),
               vocab_size=vocab_size, eod=eod, global_batch=global_batch,
               batch_schedule=BatchSchedule(global_batch, training.rampup_batch_size),
               num_microbatches=global_batch // (training.micro_batch_size * dp_size), dp_rank=dp_rank,
               dp_size=dp_size,
               data_files=[] if config.data.mock_data else dataset_files_identity(config.data.data_path),
               tokenizer=tokenizer_identity(config.data.tokenizer_type, config.data.tokenizer_model, vocab_size, eod,
                                            files=(config.data.vocab_file, config.data.merge_file),
                                            settings=tiktoken_settings(config.data)))


def resume(run: Run) -> None:
    """Load the newest checkpoint of --save (the same command resumes), else --load's. A weights-only
    one (from-hf), or --load's with --finetune, starts a fresh run from its weights. --load equal to
    --save without a checkpoint yet is a first run (Megatron-LM's recipes pass both)."""
    ckpt, arch = run.config.checkpoint, run.arch
    load_root = ckpt.load
    own = ckpt.save and checkpointing.latest_iteration(ckpt.save) is not None
    if own or (load_root and os.path.abspath(load_root) == os.path.abspath(ckpt.save or "")):
        load_root = ckpt.save if own else None
    if load_root and (checkpointing.read_run_config(load_root).get("weights_only") or (ckpt.finetune and not own)):
        load_imported_weights(load_root, run.modules, run.optimizer, arch)
        load_root = None
    if not load_root:
        return
    saved = checkpointing.read_run_config(load_root)
    # a checkpoint's run_config without the later architecture fields holds their defaults
    saved_model = saved.get("model") and dataclasses.asdict(GPTArchitecture(**saved["model"]))
    if saved_model and saved_model != dataclasses.asdict(arch):
        raise checkpointing.CheckpointError(
            f"{load_root} holds a model of another shape ({_shape_difference(saved_model, dataclasses.asdict(arch))})")
    state = checkpointing.load(load_root, run.modules, run.optimizer, run.scheduler,
                               load_optimizer=not (saved.get("reset_optimizer", False) or ckpt.no_load_optim
                                                   or not saved.get("optimizer_saved", True)),
                               load_rng=not ckpt.no_load_rng)
    common = state["common"]
    saved_tst = common["data_identity"]["tst"]
    if run.plan is None and saved_tst is not None and common["tst_state"] is None:
        # a converted phase-1 checkpoint: recovery keeps reading the data TST planned for it
        run.data_plan = TSTPlan(bag_size=saved_tst["bag_size"], total_iters=saved_tst["total_iters"],
                                switch_iter=saved_tst["switch_iter"], mode=saved_tst["mode"],
                                loss_weighting=saved_tst.get("loss_weighting", "uniform"))
    mismatch = data_state_matches(common["data_identity"], run.data_identity())
    if mismatch:
        raise checkpointing.CheckpointError(
            f"cannot resume from {checkpointing.checkpoint_dir(load_root, state['iteration'])}: {mismatch}; "
            "run with the checkpoint's settings, or give another --save directory to start a new run")
    run.iteration, run.consumed = state["iteration"], dict(common["consumed_samples"])
    run.metrics.restore(common["metrics"], run.iteration)
    if common.get("reinit_embeddings"):
        reinitialise_embeddings(run.modules, run.optimizer)


def build_data(run: Run) -> TSTData:
    config = run.config
    data = TSTData(DataConfig(
        data_path=config.data.data_path, seq_length=config.model.seq_length, global_batch_size=run.global_batch,
        batch_sizes=(run.batch_schedule.sizes(config.training.train_iters) if config.training.rampup_batch_size
                     else None),
        vocab_size=run.vocab_size, eod=run.eod, split=config.data.split, seed=config.training.seed,
        eod_mask_loss=config.data.eod_mask_loss, allow_repetition=config.data.allow_data_repetition,
        cache_dir=config.data.data_cache_path, mock=config.data.mock_data,
    ), run.data_plan, total_iters=config.training.train_iters)
    if run.iteration == 0 and run.metrics.enabled:
        for row in data.report():
            print(f"data: {row['phase']:13s} {row['dataset']}: {row['documents']:,} documents, "
                  f"{row['tokens_available']:,} tokens available, {row['tokens_planned']:,} planned, "
                  f"{row['epochs']} epoch(s)", flush=True)
    return data


def train(run: Run) -> dict:
    """Steps from run.iteration to --train-iters; saves at intervals, on a stop request, at the end."""
    training = run.config.training
    minutes = training.exit_duration_in_mins
    stop = StopFlags(run.started + 60 * minutes if minutes else None)
    orphan.stop_when_orphaned()  # a worker whose torchrun died saves and stops
    for chunk in run.chunks:
        chunk.train()
    if training.manual_gc:
        gc.disable()
        gc.collect()
    run.profiler = profiling.profiler(run.config.logging, run.config.checkpoint,
                                      dist.get_rank() if dist.is_initialized() else 0)
    try:
        return train_loop(run, stop)
    finally:
        run.profiler.stop()
        checkpointing.finalize_async_saves()  # --async-save: the last checkpoint is published before exit
        if training.manual_gc:
            gc.enable()


def train_loop(run: Run, stop: StopFlags) -> dict:
    config, data, plan, metrics = run.config, run.data, run.plan, run.metrics
    training, ckpt = config.training, config.checkpoint
    flops_per_position = model_flops_per_position(run.arch, config.model.seq_length)
    iterators, iterator_phase = None, None
    while run.iteration < training.train_iters:
        run.profiler.step(run.iteration)
        phase = data.phase_of(run.iteration)
        if phase != iterator_phase:
            if plan is not None and phase != SUPERPOSITION and ckpt.exit_at_phase_switch:
                run.save(run.iteration)
                metrics.close()
                return {"iteration": run.iteration, "stopped": "phase switch"}
            iterators = [data.micro_batches(phase, run.consumed.get(phase, 0), training.micro_batch_size,
                                            run.dp_rank, run.dp_size, config.data.num_workers or 0)
                         for _ in run.chunks]
            iterator_phase = phase
        started, batch = time.time(), run.step_batch()
        loss, grad_norm, stop_reason = train_step(run, iterators, phase, stop)
        iteration = run.iteration
        metrics.step(iteration=iteration, phase=phase, loss=loss,
                     target_entropy=plan.target_entropy if plan else 0.0,
                     lr=run.scheduler.get_lr(run.optimizer.param_groups[0]), grad_norm=grad_norm,
                     raw_tokens=batch * (data.sample_length[phase] - 1),
                     positions=batch * config.model.seq_length,
                     flops=3 * flops_per_position * batch * config.model.seq_length,
                     step_time=time.time() - started, peak_flops=config.logging.peak_flops,
                     world_size=dist.get_world_size() if dist.is_initialized() else 1,
                     log=iteration % config.logging.log_interval == 0 or iteration == training.train_iters)
        memory_cleanup(training, around_validation=False)
        if config.logging.eval_interval and (iteration % config.logging.eval_interval == 0
                                             or iteration == training.train_iters):
            memory_cleanup(training, around_validation=True)
            metrics.validation(iteration, phase, evaluate(run.chunks, data, config, run.dp_rank, run.dp_size))
            memory_cleanup(training, around_validation=True)
        if training.manual_gc and training.manual_gc_interval and iteration % training.manual_gc_interval == 0:
            gc.collect()
        if ckpt.exit_interval and iteration % ckpt.exit_interval == 0:
            stop_reason = "exit interval"
        if stop_reason:
            run.save(iteration)
            metrics.close()
            return {"iteration": iteration, "stopped": stop_reason, "history": metrics.history}
        if ckpt.save_interval and iteration % ckpt.save_interval == 0:
            run.save(iteration)
        if ckpt.async_save:  # publish a finished background save (a small all-reduce when one is in flight)
            checkpointing.finalize_async_saves(blocking=False)
    checkpointing.finalize_async_saves()
    if ckpt.save and checkpointing.latest_iteration(ckpt.save) != run.iteration:
        run.save(run.iteration)
    metrics.close()
    return {"iteration": run.iteration, "stopped": None, "history": metrics.history}


def memory_cleanup(training, around_validation: bool) -> None:
    """Megatron-LM's --manual-gc around validation and --empty-unused-memory-level."""
    if around_validation and training.manual_gc:
        gc.collect()
    if torch.cuda.is_available() and training.empty_unused_memory_level >= (2 if around_validation else 1):
        torch.cuda.empty_cache()


def train_step(run: Run, iterators, phase: str, stop: StopFlags) -> tuple[float, float, str | None]:
    """One optimizer step; returns (loss, grad norm, why every rank stops now or None)."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    batch = run.step_batch()
    micro_batches = batch // (run.config.training.micro_batch_size * run.dp_size)
    totals = run_step(run.chunks, iterators, micro_batches, run.config)
    succeeded, grad_norm, _ = run.optimizer.step()
    loss_sum, tokens, *stop_flags = torch.cat([totals, stop.agreed()]).tolist()  # one host sync
    if succeeded:  # --fp16: a step whose gradients overflowed is skipped, the LR schedule too (Megatron-LM)
        run.scheduler.step(increment=batch if lr_schedule(run.config.training)[1] else 1)
    run.iteration += 1
    run.consumed[phase] = run.consumed.get(phase, 0) + batch
    loss = loss_sum / max(tokens, 1)
    # dynamic loss scaling takes an overflowing (skipped) step as its signal, as Megatron-LM
    if not math.isfinite(loss) and (succeeded or run.config.training.loss_scale is not None):
        raise TrainingStopped(f"loss is {loss} at iteration {run.iteration} ({phase} phase); stopping "
                              "without saving. Lower --lr or check the data, then resume from the last checkpoint")
    return loss, grad_norm, StopFlags.reason(stop_flags)


def pretrain(config: PretrainConfig) -> dict:
    """Megatron-LM's pretrain: set up, resume, train."""
    run = setup(config)
    resume(run)
    run.data = build_data(run)
    return train(run)


def load_imported_weights(root: str, modules, optimizer, arch) -> None:
    """A weights-only checkpoint (``tools/convert_checkpoint.py from-hf``), or any with --finetune: load
    its weights and start a fresh run at iteration 0 with new optimizer state, schedule, RNG and data
    position (Megatron-LM's --finetune)."""
    saved = dataclasses.asdict(GPTArchitecture(**checkpointing.read_run_config(root)["model"]))
    ours = dataclasses.asdict(arch)
    training_only = ("init_method_std", "moe_aux_loss_coeff")  # hyper-parameters, not the weights' shape
    if {k: v for k, v in saved.items() if k not in training_only} != {k: v for k, v in ours.items() if k not in training_only}:
        raise checkpointing.CheckpointError(
            f"{root} holds a model of another shape ({_shape_difference(saved, ours)}); give the imported "
            "model's shape flags (see its run_config.json)")
    checkpointing.load(root, modules, optimizer, None, load_optimizer=False, load_rng=False)


def reinitialise_embeddings(modules, optimizer) -> list:
    """The paper's Table 2 ablation: fresh input embedding and output head at the switch.

    Their Adam moments (exp_avg, exp_avg_sq) are zeroed too, so the new tables do not inherit the
    phase-1 tables' update statistics; every other parameter keeps its state. megatron-core keeps
    one Adam step count for all parameters, so bias correction is not restarted: the new tables'
    first updates are smaller than a fresh optimizer's (sign-like steps of ~0.45 lr, growing to
    full size within ~10 steps). Returns the re-initialised parameters."""
    fresh = []
    with torch.no_grad(), tensor_parallel.get_cuda_rng_tracker().fork():  # distinct per TP shard
        for module in modules:
            if hasattr(module, "embedding"):
                module.config.embedding_init_method(module.embedding.word_embeddings.weight)
                fresh.append(module.embedding.word_embeddings.weight)
            if getattr(module, "post_process", False) and not module.share_embeddings_and_output_weights:
                module.config.init_method(module.output_layer.weight)
                fresh.append(module.output_layer.weight)
    optimizer.reload_model_params()  # the optimizer's fp32 main copies follow the new weights
    for moments in adam_moments(optimizer, fresh):
        for name in ("exp_avg", "exp_avg_sq"):
            if name in moments:
                moments[name].zero_()
    return fresh


def adam_moments(optimizer, params) -> list[dict]:
    """The live Adam state tensors ({"exp_avg": ..., "exp_avg_sq": ...}) of model ``params`` in a
    megatron-core optimizer, chained or not. The distributed optimizer holds state only for this
    rank's shard of each parameter (found through its model-param -> main-shard map); the float16
    optimizer for the fp32 ``main_param`` copy; the fp32 one for the parameter itself. Parameters
    without state here (another rank's shard, no step taken yet) are skipped."""
    found = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param in params:
            if hasattr(inner, "model_param_group_index_map"):  # DistributedOptimizer
                if param in inner.model_param_group_index_map:
                    state = inner._get_main_param_and_optimizer_states(param)
                    found.append({k: v for k, v in state.items() if k != "param"})
                continue
            main = getattr(param, "main_param", None)
            main = param if main is None else main
            if main in inner.optimizer.state:
                found.append(inner.optimizer.state[main])
    return found


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

    with torch.no_grad(), parameters_in_sync(chunks):
        loss_sum, tokens = run_step(chunks, [valid_batches() for _ in chunks], iters, config, forward_only=True).tolist()
    for chunk in chunks:
        chunk.train()
    return loss_sum / max(tokens, 1)


def _shape_difference(saved: dict, current: dict) -> str:
    return ", ".join(f"{k}: checkpoint {saved.get(k)} vs run {current.get(k)}"
                     for k in current if saved.get(k) != current.get(k))


def main(argv=None) -> int:
    try:
        config = parse_args(argv)
        check_environment(config)
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
