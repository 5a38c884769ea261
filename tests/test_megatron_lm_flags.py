"""Every flag of Megatron-LM core_v0.16.1's parser (megatron_tst/megatron_lm_flag_list.py, produced by
running Megatron-LM's own add_megatron_arguments) is known to ours: honoured, a no-op listed in --help,
or refused in one line naming it. Parse-only: no model, no process group."""

import collections
import json

import pytest
import torch

from megatron_tst import megatron_lm_flags, pretrain
from megatron_tst.arguments import build_parser, check_environment, parse_args
from megatron_tst.megatron_lm_flag_list import GROUPS

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "512",
        "--seq-length", "32", "--train-iters", "4"]


def test_every_megatron_lm_flag_is_known_and_each_refusal_is_one_line_naming_it():
    parser = build_parser()
    kinds = megatron_lm_flags.classify(parser)
    assert len(kinds) == sum(len(flags) for flags in GROUPS.values()) > 650  # no flag twice, the whole list
    assert [flag for flag, kind in kinds.items() if kind == "unknown"] == []
    counts = collections.Counter(kinds.values())
    assert counts["honoured"] > 100 and counts["no-op"] >= len(megatron_lm_flags.NO_OPS) and counts["refused"] > 300
    # every refused flag, with the values Megatron-LM could give it (none, one, several, negative)
    for flag, kind in kinds.items():
        if kind != "refused" or flag not in _generic(parser):
            continue
        for values in ([], ["1"], ["a", "b", "-1"]):
            namespace = vars(parser.parse_args(TINY + [flag, *values]))
            lines = megatron_lm_flags.refusals(namespace)
            assert len(lines) == 1 and lines[0].startswith(f"{flag}: ") and lines[0].endswith("; drop it"), lines
            assert "\n" not in lines[0] and not any(key.startswith("megatron_lm ") for key in namespace)
    # through parse_args itself, one flag of every group that has a refused one, checked or not
    for group, flags in GROUPS.items():
        refused = [flag for flag in flags if kinds[flag] == "refused" and flag in _generic(parser)]
        if refused:
            for check in (True, False):
                with pytest.raises(ValueError) as error:
                    parse_args(TINY + [refused[-1], "x"], check=check)
                assert str(error.value) == f"{refused[-1]}: {megatron_lm_flags.reason(refused[-1], group)}"
    # the no-ops parse (with or without a value) and change nothing
    plain = parse_args(TINY)
    for flag in megatron_lm_flags.NO_OPS:
        assert parse_args(TINY + [flag]) == plain == parse_args(TINY + [flag, "0"])


def test_help_lists_the_no_ops_and_main_prints_a_refusal_in_one_line(capsys):
    text = " ".join(build_parser().format_help().split())
    for flag, why in megatron_lm_flags.NO_OPS.items():
        assert f"{flag} [VALUE ...] accepted, no effect: {' '.join(why.split())}" in text
    for flag in ("--use-mcore-models", "--calculate-per-token-loss"):  # arguments.py's own no-ops
        assert text.rsplit(flag, 1)[1].split("--")[0].strip().startswith("accepted, no effect")
    assert "--inference-max-requests" not in text and "(682 in all) parses and is refused" in text
    assert pretrain.main(TINY + ["--use-legacy-models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --use-legacy-models: {megatron_lm_flags.reason('--use-legacy-models', 'training')}"
    assert not any("usage:" in line for line in err)


def _generic(parser):
    """The flags megatron_lm_flags added (arguments.py's own _refused ones are checked by validate)."""
    return {flag for flag, action in parser._option_string_actions.items() if action.dest.startswith("megatron_lm ")}


def test_what_this_machine_cannot_run_is_refused_in_one_line():
    ours, other = ("nccl", "gloo") if torch.cuda.is_available() else ("gloo", "nccl")
    local = TINY + ["--transformer-impl", "local"]
    check_environment(parse_args(local + ["--distributed-backend", ours, "--fp32-residual-connection"]))
    with pytest.raises(ValueError, match=f"^--distributed-backend {other}: this machine runs {ours} "):
        check_environment(parse_args(local + ["--distributed-backend", other]))
    with pytest.raises(ValueError, match="^--fp32-residual-connection with --bf16/--fp16 needs Transformer Engine"):
        check_environment(parse_args(local + ["--fp32-residual-connection", "--bf16"]))
    # Megatron-LM's GPT defaults (biases) with experts: megatron-core's local expert MLP cannot train it
    moe = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
           "--num-experts", "4", "--transformer-impl", "local"]
    with pytest.raises(ValueError, match="^MoE experts with biases .* add --disable-bias-linear"):
        check_environment(parse_args(moe))
    check_environment(parse_args(moe + ["--disable-bias-linear"]))


def test_honoured_megatron_lm_flags_reach_megatron_core_configs(single_rank):
    from megatron.core.utils import unwrap_model

    chunks_of = {}

    def built(argv):
        config = parse_args(TINY + argv)
        arch = config.model.architecture(vocab_size=512)
        chunks, model_config = pretrain.build_model(config, arch, None)
        optimizer, _ = pretrain.build_optimizer(config, chunks, model_config)
        inner = [opt.optimizer for opt in optimizer.chained_optimizers]
        rows = unwrap_model(chunks)[0].embedding.word_embeddings.weight.shape[0]
        chunks_of["last"] = chunks
        return arch, model_config, chunks[0].ddp_config, inner, rows

    arch, model_config, ddp, inner, rows = built(
        ["--make-vocab-size-divisible-by", "96", "--optimizer", "sgd", "--sgd-momentum", "0.5",
         "--ddp-bucket-size", "4096", "--overlap-grad-reduce", "--fp32-residual-connection",
         "--embedding-init-method-std", "0.5",
         "--recompute-activations",
         "--use-rotary-position-embeddings", "--accumulate-allreduce-grads-in-fp32", "--dataloader-type", "single",
         "--use-flash-attn", "--local-rank", "0", "--exit-signal", "SIGINT", "--exit-signal-handler"])
    assert model_config.recompute_granularity == "selective" and arch.position_embedding_type == "rope"
    assert rows == 576 and arch.make_vocab_size_divisible_by == 96  # 512 padded to 6 x 96
    assert model_config.fp32_residual_connection and model_config.embedding_init_method_std == 0.5
    assert abs(unwrap_model(chunks_of["last"])[0].embedding.word_embeddings.weight.std().item() - 0.5) < 0.02
    assert ddp.bucket_size == 4096 and ddp.grad_reduce_in_fp32
    assert all(type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.5 for opt in inner)
    arch, model_config, ddp, inner, rows = built(["--optimizer", "sgd"])
    assert all(opt.param_groups[0]["momentum"] == 0.9 for opt in inner)  # Megatron-LM's default
    assert built(["--overlap-grad-reduce"])[2].bucket_size == 40_000_000  # megatron-core's default
    arch, model_config, ddp, inner, rows = built([])  # without them: Megatron-LM's defaults
    assert rows == 512 and model_config.recompute_granularity is None and not model_config.fp32_residual_connection
    moe = built(["--num-experts", "2", "--moe-router-dtype", "fp64", "--moe-z-loss-coeff", "1e-3",
                 "--moe-input-jitter-eps", "0.01"])[1]
    assert (moe.moe_router_dtype, moe.moe_z_loss_coeff, moe.moe_input_jitter_eps) == ("fp64", 1e-3, 0.01)
    assert arch.position_embedding_type == "learned_absolute"
    assert ddp.bucket_size is None and all(type(opt) is torch.optim.AdamW or "Adam" in type(opt).__name__
                                           for opt in inner)
    for argv, message in (
            (["--optimizer", "muon"], "--optimizer muon is not supported; use adam or sgd"),
            (["--sgd-momentum", "0.5"], "--sgd-momentum needs --optimizer sgd"),
            (["--dataloader-type", "cyclic"], "--dataloader-type cyclic is not supported"),
            (["--recompute-activations", "--recompute-granularity", "full"],
             "--recompute-activations means --recompute-granularity selective, not full"),
            (["--use-rotary-position-embeddings", "--position-embedding-type", "learned_absolute"],
             "--use-rotary-position-embeddings means --position-embedding-type rope"),
            (["--accumulate-allreduce-grads-in-fp32", "--bf16", "--grad-reduce-in-bf16"], "contradict each other"),
            (["--ddp-bucket-size", "0"], "--ddp-bucket-size must be >= 1"),
            (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be >= 1"),
            (["--moe-z-loss-coeff", "1e-3"], "--moe-z-loss-coeff is an MoE setting: give --num-experts"),
            (["--num-experts", "2", "--moe-router-dtype", "bf16"], "--moe-router-dtype bf16 is not one of"),
            (["--exit-signal", "SIGUSR1"], "--exit-signal SIGUSR1: only SIGTERM and SIGINT save and stop here"),
            (["--distributed-backend", "mpi"], "--distributed-backend mpi is not one of nccl, gloo")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            parse_args(TINY + argv)


def test_sgd_resumes_bit_identically_from_a_checkpoint(tmp_path):
    """--optimizer sgd through a checkpoint: megatron-core 0.16.1 cannot lay out SGD's state to load it
    without our init_state_fn (optimizer.sgd_checkpoints_load); the momentum must come back exactly."""
    argv = TINY + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--optimizer", "sgd", "--lr", "0.5",
                   "--lr-decay-style", "constant", "--micro-batch-size", "2", "--log-interval", "1"]
    assert pretrain.main(argv + ["--save", str(tmp_path / "whole")]) == 0
    for _ in range(2):  # stops after step 2, then the same command resumes
        assert pretrain.main(argv + ["--save", str(tmp_path / "split"), "--exit-interval", "2"]) == 0

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r}

    whole, split = records("whole"), records("split")
    assert sorted(whole) == [1, 2, 3, 4] and split == whole
    assert whole[4] != whole[3]  # the steps do change the model


def test_no_save_optim_and_no_save_rng_leave_that_state_out_and_resume_as_no_load(tmp_path):
    """A checkpoint written with --no-save-optim --no-save-rng holds neither; resumed by the same
    command it trains exactly as a full checkpoint resumed with --no-load-optim --no-load-rng."""
    from torch.distributed.checkpoint import FileSystemReader

    argv = TINY + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--lr", "1e-2", "--lr-decay-style", "constant",
                   "--micro-batch-size", "2", "--log-interval", "1", "--exit-interval", "2"]
    full, bare = argv + ["--save", str(tmp_path / "full")], argv + ["--save", str(tmp_path / "bare")]
    assert pretrain.main(full) == 0 and pretrain.main(full + ["--no-load-optim", "--no-load-rng"]) == 0
    bare += ["--no-save-optim", "--no-save-rng"]
    assert pretrain.main(bare) == 0 and pretrain.main(bare) == 0

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r}

    assert sorted(records("full")) == [1, 2, 3, 4] and records("bare") == records("full")
    for name, saved in (("full", True), ("bare", False)):
        directory = tmp_path / name / "iter_0000002"
        keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        assert any(key.startswith("optimizer") for key in keys) == saved
        assert (directory / "rng").is_dir() == saved
        assert json.loads((directory / "run_config.json").read_text())["optimizer_saved"] == saved
