"""Every Megatron-LM flag is known: those our parser does not declare itself (arguments.py) are added
here from Megatron-LM's own list (megatron_lm_flag_list.py), as a no-op where Megatron-LM's meaning is
inert here (listed in --help) or else refused in one line naming the flag and why. A refused flag takes
whatever values Megatron-LM gives it (any number), so the error is that line, never argparse's usage."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_tst.megatron_lm_flag_list import GROUPS
from megatron_tst.models import preset

_DEST = "megatron_lm "  # namespace key prefix: a space, so never one of our own fields

# Accepted and inert here: Megatron-LM's meaning changes nothing in what this project builds or runs
NO_OPS = {
    "--local-rank": "the local rank comes from torchrun's LOCAL_RANK, as in Megatron-LM",
    "--disable-msc": "Multi-Storage Client is never used here",
    "--no-one-logger": "one-logger telemetry is never used here",
    "--no-persist-layer-norm": "Apex's persistent LayerNorm kernel is never built here (megatron-core's "
                               "default is already off)",
    # deprecated in Megatron-LM, which ignores them too
    "--use-dist-ckpt": "deprecated in Megatron-LM, no effect there either (--ckpt-format chooses)",
    "--dist-ckpt-format": "deprecated in Megatron-LM, no effect there either (--ckpt-format chooses)",
    "--ckpt-fully-parallel-save": "deprecated in Megatron-LM, no effect there either (saves are fully parallel)",
    "--use-flash-attn": "Megatron-LM's megatron-core models ignore it too (--attention-backend chooses)",
    "--exit-signal-handler": "SIGTERM and SIGINT always save a checkpoint and stop after the step here",
    "--attention-softmax-in-fp32": "every build keeps megatron-core's TransformerConfig default "
                                   "attention_softmax_in_fp32=True, which is what it asks for",
}

# Megatron-LM's own refusal, or a reason more precise than the group's
FLAG_REASONS = {
    "--checkpoint-activations": "no longer valid in Megatron-LM either: use --recompute-activations, or "
                                "--recompute-granularity with --recompute-method",
    "--openai-gelu": "only GeLU (the default) and SwiGLU (--swiglu) MLPs are built here",
    "--squared-relu": "only GeLU (the default) and SwiGLU (--swiglu) MLPs are built here",
    "--quick-geglu": "only GeLU (the default) and SwiGLU (--swiglu) MLPs are built here",
    "--use-legacy-models": "Megatron-LM's legacy models are not supported (models are megatron-core's)",
    "--pretrained-checkpoint": "fine-tune from a checkpoint with --load DIR --finetune here",
    "--use-checkpoint-args": "give the model's flags (the checkpoint's run_config.json records its shape; a "
                             "different one is refused)",
    "--auto-detect-ckpt-format": "checkpoints are always torch_dist here",
    "--add-qkv-bias": "biases are all or none here (--disable-bias-linear); QKV-only biases are not built",
    "--encoder-seq-length": "encoder-decoder models are not part of GPT pretraining here (use --seq-length)",
    "--decoder-seq-length": "encoder-decoder models are not part of GPT pretraining here (use --seq-length)",
    "--train-data-path": "per-split data paths are not supported: give --data-path (a blend) and --split",
    "--valid-data-path": "per-split data paths are not supported: give --data-path (a blend) and --split",
    "--test-data-path": "per-split data paths are not supported: give --data-path (a blend) and --split",
    "--log-params-norm": "the parameter norm is not logged here (the gradient norm is)",
    "--log-num-zeros-in-grad": "zeros in the gradients are not counted here",
}


def _help(text, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MegatronLMOptions:
    """Megatron-LM flags honoured as aliases of ours or passed to megatron-core's configs."""
    optimizer: str | None = _help("adam (the default: megatron-core's Adam with decoupled weight decay) or sgd",
                                  default=None)
    sgd_momentum: float | None = _help("with --optimizer sgd: its momentum (default 0.9, as Megatron-LM)",
                                       default=None)
    recompute_activations: bool = _help("Megatron-LM's alias of --recompute-granularity selective", default=False)
    use_rotary_position_embeddings: bool = _help("Megatron-LM's legacy alias of --position-embedding-type rope",
                                                 default=False)
    accumulate_allreduce_grads_in_fp32: bool = _help("gradients accumulated and reduced in fp32: the default "
                                                     "here (as Megatron-LM with --bf16); contradicts "
                                                     "--grad-reduce-in-bf16", default=False)
    ddp_bucket_size: int | None = _help("gradient-reduction bucket size in elements, with --overlap-grad-reduce "
                                        "(megatron-core's DistributedDataParallelConfig.bucket_size)", default=None)
    distributed_backend: str | None = _help("nccl or gloo: accepted where it is the one this machine uses (nccl "
                                            "with CUDA, gloo without)", default=None)
    # megatron-core TransformerConfig fields passed through (transformer_settings): training-time only, so a
    # model trained with them exports as one without
    fp32_residual_connection: bool = _help("keep the residual stream in fp32 (TransformerConfig)", default=False)
    embedding_init_method_std: float | None = _help("init std of the embedding (default --init-method-std; "
                                                    "TransformerConfig)", default=None)
    moe_router_dtype: str | None = _help("fp32 or fp64: the MoE router's compute dtype (TransformerConfig)",
                                         default=None)
    moe_z_loss_coeff: float | None = _help("MoE router z-loss weight (TransformerConfig)", default=None)
    moe_input_jitter_eps: float | None = _help("MoE router input jitter (TransformerConfig)", default=None)
    exit_signal: str | None = _help("SIGTERM (the default) or SIGINT: the signal that saves and stops; both do "
                                    "here", default=None)
    dataloader_type: str | None = _help("single (Megatron-LM's default: each sample once, in order): the only "
                                        "one here", default=None)

# Why a whole Megatron-LM argument group is refused (its flags that we honour are declared in arguments.py)
GROUP_REASONS = {
    "transformer configuration": "a megatron-core TransformerConfig setting this GPT pretraining does not take",
    "network size": "a model variant this GPT pretraining does not build",
    "regularization": "only AdamW's settings are taken here (no SGD/Muon optimizers, no weight-decay conditions)",
    "profiling": "CUDA memory-history snapshots are not supported (--profile writes a torch.profiler trace)",
    "training": "not supported by this GPT pretraining",
    "rl": "RL flags are not part of GPT pretraining here",
    "RNG and initialization": "not supported (weights initialise as megatron-core's default from --seed)",
    "learning rate and weight decay": "not supported (the schedule comes from the --lr* flags, a constant "
                                      "--weight-decay)",
    "checkpointing": "not supported (torch_dist checkpoints with --save/--save-interval/--load)",
    "mixed precision": "not supported here",
    "distributed": "not supported here",
    "validation": "not supported (validation runs every --eval-interval on --split's valid part)",
    "data and dataloader": "not supported (one --data-path blend split by --split, or --mock-data)",
    "tokenizer": "this tokenizer option is not supported here",
    "autoresume": "ADLR autoresume is not supported (use --exit-duration-in-mins and the launcher)",
    "biencoder": "biencoder/retriever flags are not part of GPT pretraining here",
    "vision": "vision flags are not part of GPT pretraining here",
    "moe": "this MoE option is not supported here",
    "mla": "multi-latent attention (DeepSeek) is not supported here",
    "experimental_attention_variant": "experimental attention variants are not supported here",
    "heterogeneous architecture": "heterogeneous layer configs are not supported here",
    "logging": "this logging option is not supported (metrics.jsonl, TensorBoard and W&B get loss, LR, grad "
               "norm and throughput)",
    "straggler": "straggler detection (nvidia-resiliency-ext) is not supported here",
    "workload inspector": "the workload inspector server is not supported here",
    "inference": "inference flags are not part of GPT pretraining here",
    "Transformer-Engine": "Transformer Engine precision config files are not supported here",
    "experimental": "Megatron-LM's experimental features (hybrid/Mamba specs, YAML configs, precision-aware "
                    "optimizer) are not supported here",
    "one logger": "one-logger telemetry is not part of this project",
    "In-process restart": "in-process restart (nvidia-resiliency-ext) is not supported; the launcher resumes "
                          "from the last checkpoint",
    "ft_package": "the fault-tolerance package (nvidia-resiliency-ext) is not supported here",
    "rerun engine": "the rerun state machine is not supported here",
    "msc": "Multi-Storage Client is not supported here",
    "sft": "SFT flags are not part of GPT pretraining here",
    "kitchen": "NVIDIA kitchen quantization is not supported here",
}

# A more precise reason for families of flags, by prefix (the first that matches wins)
PREFIX_REASONS = (
    (("--tp-comm-", "--no-tp-comm-", "--disable-tp-comm-"),
     "tensor-parallel communication overlap (Transformer Engine userbuffers) is not supported here"),
    (("--mtp-",), "multi-token prediction is not supported here"),
    (("--fp4-",), "FP4 is not supported here (FP8: --fp8-format)"),
    (("--enable-cuda-graph", "--cuda-graph-", "--external-cuda-graph"), "CUDA graphs are not supported here"),
    (("--mamba-", "--is-hybrid-model", "--hybrid-"), "Mamba/hybrid models are not part of GPT pretraining here"),
    (("--inference-", "--flash-decode", "--mlp-chunks-for-prefill"), "inference flags are not part of GPT "
                                                                    "pretraining here"),
    (("--use-megatron-fsdp", "--use-torch-fsdp2", "--torch-fsdp2-", "--fsdp-", "--data-parallel-sharding-strategy",
      "--outer-dp-sharding-strategy", "--enable-full-sharding-in-hsdp"),
     "FSDP is not supported here (shard optimizer state with --use-distributed-optimizer)"),
    (("--fim-",), "fill-in-the-middle data is not supported here"),
    (("--non-persistent-",), "non-persistent (local) checkpoints are not supported here"),
    (("--ckpt-convert-",), "checkpoint format conversion is not supported (torch_dist is the only format)"),
    (("--muon-", "--sgd-momentum"), "only the AdamW optimizer is supported here"),
    (("--dsa-indexer-", "--linear-conv-", "--linear-key-", "--linear-value-", "--linear-num-"),
     "experimental attention variants are not supported here"),
    (("--moe-",), "this MoE option is not supported here (taken: --num-experts, --moe-router-topk, "
                  "--moe-ffn-hidden-size, --moe-aux-loss-coeff, --moe-router-load-balancing-type, "
                  "--moe-grouped-gemm, --moe-token-dispatcher-type)"),
)


def reason(flag: str, group: str) -> str:
    if flag in FLAG_REASONS:
        return f"{FLAG_REASONS[flag]}; drop it"
    for prefixes, why in PREFIX_REASONS:
        if flag.startswith(prefixes):
            return f"{why}; drop it"
    return f"{GROUP_REASONS[group]}; drop it"


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    """Declare each Megatron-LM flag that ``parser`` does not have: the no-ops with their reason in
    --help, the rest refused (hidden from --help, which says so once)."""
    declared = set(parser._option_string_actions)
    no_ops = parser.add_argument_group(
        "Megatron-LM flags accepted with no effect", "each is inert here, for the reason given")
    refused = parser.add_argument_group(
        "other Megatron-LM flags", f"every other flag of Megatron-LM core_v0.16.1 ({len(all_flags())} in all) "
        "parses and is refused in one line naming it and why")
    for group, flags in GROUPS.items():
        for flag in flags:
            if flag in declared:
                continue
            if flag in NO_OPS:
                no_ops.add_argument(flag, dest=_DEST + flag, nargs="*", default=None, metavar="VALUE",
                                    help=f"accepted, no effect: {NO_OPS[flag]}")
            else:
                refused.add_argument(flag, dest=_DEST + flag, nargs="*", default=None, help=argparse.SUPPRESS)
            declared.add(flag)


def refusals(namespace: dict) -> list[str]:
    """"--flag: reason" for each refused Megatron-LM flag given; removes every key this module added."""
    lines = []
    for group, flags in GROUPS.items():
        for flag in flags:
            given = namespace.pop(_DEST + flag, None)
            if given is not None and flag not in NO_OPS:
                lines.append(f"{flag}: {reason(flag, group)}")
    return lines


def all_flags() -> dict[str, str]:
    """Megatron-LM's flags with their group title."""
    return {flag: group for group, flags in GROUPS.items() for flag in flags}


def classify(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each Megatron-LM flag as ``parser`` takes it: honoured, no-op or refused (from its help text:
    arguments.py's ``_no_op``/``_refused`` and this module's); "unknown" if it is not declared."""
    kinds = {}
    for flag in all_flags():
        action = parser._option_string_actions.get(flag)
        if action is None:
            kinds[flag] = "unknown"
        elif action.help == argparse.SUPPRESS or (action.help or "").startswith("refused:"):
            kinds[flag] = "refused"
        elif (action.help or "").startswith("accepted, no effect"):
            kinds[flag] = "no-op"
        else:
            kinds[flag] = "honoured"
    return kinds


def apply_aliases(namespace: dict) -> None:
    """Megatron-LM's alias flags set the flag they stand for (a contradiction is one line)."""
    for alias, target, value in (("recompute_activations", "recompute_granularity", "selective"),
                                 ("use_rotary_position_embeddings", "position_embedding_type", "rope")):
        if namespace[alias]:
            given = namespace[target]
            if given not in (None, value):
                raise ValueError(f"--{alias.replace('_', '-')} means --{target.replace('_', '-')} {value}, "
                                 f"not {given}; give one")
            namespace[target] = value


def validate(config) -> None:
    options = config.megatron_lm
    if options.optimizer not in (None, "adam", "sgd"):
        raise ValueError(f"--optimizer {options.optimizer} is not supported; use adam or sgd")
    if options.sgd_momentum is not None and options.optimizer != "sgd":
        raise ValueError("--sgd-momentum needs --optimizer sgd; give it, or drop --sgd-momentum")
    if options.dataloader_type not in (None, "single"):
        raise ValueError(f"--dataloader-type {options.dataloader_type} is not supported (each sample is read once, "
                         "in order); use single or drop it")
    if options.accumulate_allreduce_grads_in_fp32 and config.training.grad_reduce_in_bf16:
        raise ValueError("--accumulate-allreduce-grads-in-fp32 and --grad-reduce-in-bf16 contradict each other; "
                         "give one")
    if options.exit_signal not in (None, "SIGTERM", "SIGINT"):
        raise ValueError(f"--exit-signal {options.exit_signal}: only SIGTERM and SIGINT save and stop here; give one "
                         "of them or drop it")
    if options.distributed_backend not in (None, "nccl", "gloo"):
        raise ValueError(f"--distributed-backend {options.distributed_backend} is not one of nccl, gloo")
    if options.moe_router_dtype not in (None, "fp32", "fp64"):
        raise ValueError(f"--moe-router-dtype {options.moe_router_dtype} is not one of fp32, fp64")
    moe = config.model.num_experts or (config.model.model_preset and preset(config.model.model_preset).num_experts)
    for name in ("moe_router_dtype", "moe_z_loss_coeff", "moe_input_jitter_eps"):
        if getattr(options, name) is not None and not moe:
            raise ValueError(f"--{name.replace('_', '-')} is an MoE setting: give --num-experts, or drop it")
    divisor = config.model.make_vocab_size_divisible_by
    if divisor is not None and divisor < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {divisor}")
    if options.ddp_bucket_size is not None and options.ddp_bucket_size < 1:
        raise ValueError(f"--ddp-bucket-size must be >= 1, got {options.ddp_bucket_size}")


def optimizer_settings(config) -> dict:
    """OptimizerConfig's optimizer fields."""
    options = config.megatron_lm
    if options.optimizer == "sgd":
        return dict(optimizer="sgd", sgd_momentum=0.9 if options.sgd_momentum is None else options.sgd_momentum)
    return dict(optimizer="adam")


def transformer_settings(config) -> dict:
    """TransformerConfig fields of the pass-through flags that are given."""
    options = config.megatron_lm
    names = ("embedding_init_method_std", "moe_router_dtype", "moe_z_loss_coeff", "moe_input_jitter_eps")
    settings = {name: getattr(options, name) for name in names if getattr(options, name) is not None}
    return dict(settings, fp32_residual_connection=True) if options.fp32_residual_connection else settings


def ddp_settings(config) -> dict:
    """DistributedDataParallelConfig fields of Megatron-LM flags passed through as they are."""
    size = config.megatron_lm.ddp_bucket_size
    return dict(bucket_size=size) if size is not None else {}


def environment_problems(config) -> list[str]:
    """What this machine cannot run of the flags above (arguments.environment_problems)."""
    from megatron_tst.arguments import resolved_transformer_impl
    from megatron_tst.platform import distributed_backend

    problems = []
    given, ours = config.megatron_lm.distributed_backend, distributed_backend()
    if given is not None and given != ours:
        cuda = "with" if ours == "nccl" else "without"
        problems.append(f"--distributed-backend {given}: this machine runs {ours} ({cuda} CUDA); give "
                        f"--distributed-backend {ours} or drop it")
    half = config.model.bf16 or config.model.fp16
    if config.megatron_lm.fp32_residual_connection and half and resolved_transformer_impl(config.model) == "local":
        # megatron-core's local spec builds torch norms, whose half weights refuse the fp32 residual
        problems.append("--fp32-residual-connection with --bf16/--fp16 needs Transformer Engine's norms; install it, "
                        "or drop --fp32-residual-connection")
    return problems


if __name__ == "__main__":  # python -m megatron_tst.megatron_lm_flags [--list]: how each flag is taken
    import collections
    import sys

    from megatron_tst.arguments import build_parser

    kinds = classify(build_parser())
    if "--list" in sys.argv[1:]:
        for flag, kind in kinds.items():
            print(f"{kind}\t{all_flags()[flag]}\t{flag}")
    print(", ".join(f"{count} {kind}" for kind, count in collections.Counter(kinds.values()).most_common()),
          f"of Megatron-LM's {len(kinds)} flags")
