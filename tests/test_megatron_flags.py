"""Megatron-LM drop-in: the flag lists of Megatron-LM's own example launch scripts (core_v0.16.1)
parse, each flag is honoured or refused in one line naming it, and a flag set without a preset
builds Megatron-LM's GPT (LayerNorm, GeLU, learned positions, biases, tied) as megatron-core does."""

import dataclasses
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from megatron.core.transformer.enums import AttnBackend
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import unwrap_model

from megatron_tst import pretrain
from megatron_tst.arguments import (
    check_environment, environment_problems, model_settings, parse_args, refused_flags, resolved_transformer_impl,
)
from megatron_tst.models import GPTArchitecture, build_gpt_model, transformer_config
from megatron_tst.models.gpt import transformer_engine_available
from megatron_tst.tst import TSTGPTModel

# The flag names of Megatron-LM core_v0.16.1's examples/llama/train_llama3_8b_h100_fp8.sh (both of
# its data branches), examples/gpt3/train_gpt3_175b_distributed.sh and
# examples/mixtral/train_mixtral_8x7b_distributed.sh (torchrun's own flags left out), in order.
LLAMA3_8B = """
--use-mcore-models --num-layers --hidden-size --ffn-hidden-size --num-attention-heads --group-query-attention
--num-query-groups --kv-channels --seq-length --max-position-embeddings --position-embedding-type --rotary-base
--rotary-percent --attention-dropout --hidden-dropout --swiglu --init-method-std --attention-backend
--apply-layernorm-1p --untie-embeddings-and-output-weights --disable-bias-linear
--micro-batch-size --global-batch-size --train-samples --lr-decay-samples --lr-warmup-samples --lr --min-lr
--decoupled-lr --decoupled-min-lr --lr-decay-style --clip-grad --weight-decay --adam-beta1 --adam-beta2 --bf16
--grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc
--empty-unused-memory-level --exit-duration-in-mins
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--fp8-format --fp8-amax-history-len --fp8-amax-compute-algo --fp8-param-gather
--tensor-model-parallel-size --context-parallel-size --sequence-parallel
{data}
--log-interval --eval-iters --eval-interval --save-interval --log-throughput --profile --profile-step-start
--profile-step-end --ckpt-format --distributed-timeout-minutes --save --load --tensorboard-dir
"""
LLAMA3_MOCK_DATA = """--mock-data --tokenizer-type --vocab-size --data-cache-path --tiktoken-pattern --split
--no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers"""
LLAMA3_REAL_DATA = """--data-path --tokenizer-type --tokenizer-model --data-cache-path --split
--no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers --vocab-size"""
GPT3_175B = """
--num-layers --hidden-size --num-attention-heads --seq-length --max-position-embeddings --attention-backend
--micro-batch-size --global-batch-size --rampup-batch-size --train-iters --weight-decay --adam-beta1 --adam-beta2
--init-method-std --clip-grad --fp16 --lr --lr-decay-style --min-lr --lr-warmup-fraction --lr-decay-iters
--tensor-model-parallel-size --pipeline-model-parallel-size
--data-path --vocab-file --merge-file --split
--log-interval --save-interval --eval-interval --save --load --eval-iters --tensorboard-dir
"""
MIXTRAL_8X7B = """
--use-mcore-models --disable-bias-linear --seq-length --max-position-embeddings --num-layers --hidden-size
--ffn-hidden-size --num-attention-heads --init-method-std --attention-dropout --hidden-dropout --normalization
--position-embedding-type --swiglu --untie-embeddings-and-output-weights --group-query-attention
--num-query-groups --no-masked-softmax-fusion --no-position-embedding --rotary-base
--num-experts --moe-router-topk --moe-router-load-balancing-type --moe-aux-loss-coeff --moe-grouped-gemm
--moe-token-dispatcher-type --overlap-param-gather --overlap-grad-reduce
--tokenizer-type --tokenizer-model --data-path --split
--micro-batch-size --global-batch-size --lr --train-iters --lr-decay-iters --lr-decay-style --min-lr
--weight-decay --lr-warmup-iters --clip-grad --bf16
--tensor-model-parallel-size --pipeline-model-parallel-size --expert-model-parallel-size
--use-distributed-optimizer --sequence-parallel
--log-interval --save-interval --eval-interval --eval-iters --save --load --tensorboard-dir --no-load-optim
--no-load-rng --wandb-project --wandb-exp-name
"""
RECIPES = {
    "llama3_8b_mock_data": LLAMA3_8B.format(data=LLAMA3_MOCK_DATA),
    "llama3_8b_real_data": LLAMA3_8B.format(data=LLAMA3_REAL_DATA),
    "gpt3_175b": GPT3_175B,
    "mixtral_8x7b": MIXTRAL_8X7B,
}

# Tiny values for the flags that take one (the recipes' own where size does not matter; every
# parallel size 1, so one process builds the model). Switches are absent.
VALUES = {
    "--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "96", "--num-attention-heads": "4",
    "--num-query-groups": "2", "--kv-channels": "16", "--seq-length": "32", "--max-position-embeddings": "64",
    "--rotary-base": "1000000", "--rotary-percent": "0.5", "--attention-dropout": "0.0",
    "--hidden-dropout": "0.0", "--init-method-std": "0.0134", "--attention-backend": "auto",
    "--micro-batch-size": "1", "--global-batch-size": "4", "--train-samples": "400", "--lr-decay-samples": "390",
    "--lr-warmup-samples": "8", "--lr": "1.5e-4", "--min-lr": "1e-5", "--decoupled-lr": "5e-4",
    "--decoupled-min-lr": "4.5e-5", "--lr-decay-style": "cosine", "--clip-grad": "0.5", "--weight-decay": "0.05",
    "--adam-beta1": "0.85", "--adam-beta2": "0.9", "--empty-unused-memory-level": "1",
    "--exit-duration-in-mins": "235", "--fp8-format": "hybrid", "--fp8-amax-history-len": "1024",
    "--fp8-amax-compute-algo": "max", "--tensor-model-parallel-size": "1", "--context-parallel-size": "1",
    "--pipeline-model-parallel-size": "1", "--expert-model-parallel-size": "1", "--vocab-size": "512",
    "--data-cache-path": "cache", "--tiktoken-pattern": "v2", "--split": "99,1,0", "--num-workers": "1",
    "--data-path": "corpus_text_document", "--tokenizer-model": "tokenizer", "--log-interval": "1",
    "--eval-iters": "2", "--eval-interval": "100", "--save-interval": "1000", "--profile-step-start": "4",
    "--profile-step-end": "6", "--ckpt-format": "torch_dist", "--distributed-timeout-minutes": "60",
    "--save": "ckpt", "--load": "ckpt", "--tensorboard-dir": "tb", "--rampup-batch-size": ["2", "2", "100"],
    "--train-iters": "100", "--lr-warmup-fraction": ".001", "--lr-decay-iters": "80", "--vocab-file": "vocab.json",
    "--merge-file": "merges.txt", "--normalization": "RMSNorm", "--position-embedding-type": "rope",
    "--num-experts": "4", "--moe-router-topk": "2", "--moe-router-load-balancing-type": "aux_loss",
    "--moe-aux-loss-coeff": "1e-2", "--moe-token-dispatcher-type": "alltoall", "--lr-warmup-iters": "5",
    "--wandb-project": "Mixtral", "--wandb-exp-name": "Mixtral_8x7B",
}
TOKENIZER = {"llama3_8b_mock_data": "NullTokenizer", "llama3_8b_real_data": "HuggingFaceTokenizer",
             "mixtral_8x7b": "Llama2Tokenizer"}

# What is refused, by recipe: not implemented yet (validate), or not runnable on a machine without
# Transformer Engine (check_environment)
REFUSED = {"--no-mmap-bin-files"}
NEEDS_TE = {"--apply-layernorm-1p", "--fp8-format", "--moe-grouped-gemm"}
NEEDS_WANDB = set() if importlib.util.find_spec("wandb") else {"--wandb-project"}  # its package, not installed
FP8_SETTINGS = {"--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-param-gather"}


def recipe_argv(name, *, drop=()):
    argv = []
    for flag in RECIPES[name].split():
        if flag in drop:
            continue
        value = TOKENIZER[name] if flag == "--tokenizer-type" else VALUES.get(flag, [])
        argv += [flag] + ([value] if isinstance(value, str) else value)
    return argv


def leading_flag(message):
    return message.split(":")[0].split()[0]


def dry_build(config, vocab_size=512):
    """What pretrain builds before its first step: model chunks, optimizer, scheduler."""
    arch = config.model.architecture(vocab_size=vocab_size)
    plan = config.tst.plan(config.training.train_iters)
    chunks, model_config = pretrain.build_model(config, arch, plan)
    optimizer, scheduler = pretrain.build_optimizer(config, chunks, model_config)
    assert chunks[0].ddp_config.grad_reduce_in_fp32 != config.training.grad_reduce_in_bf16
    return arch, unwrap_model(chunks)[0], model_config, optimizer, scheduler


# flag -> (what it sets, the value the tiny flag set must give there)
HONOURED = {
    "--num-layers": (lambda c, m, o, s: c.num_layers, 2),
    "--hidden-size": (lambda c, m, o, s: c.hidden_size, 64),
    "--ffn-hidden-size": (lambda c, m, o, s: c.ffn_hidden_size, 96),
    "--num-attention-heads": (lambda c, m, o, s: c.num_attention_heads, 4),
    "--num-query-groups": (lambda c, m, o, s: c.num_query_groups, 2),
    "--kv-channels": (lambda c, m, o, s: c.kv_channels, 16),
    "--init-method-std": (lambda c, m, o, s: c.init_method_std, 0.0134),
    "--attention-dropout": (lambda c, m, o, s: c.attention_dropout, 0.0),
    "--hidden-dropout": (lambda c, m, o, s: c.hidden_dropout, 0.0),
    "--swiglu": (lambda c, m, o, s: (c.gated_linear_unit, c.activation_func), (True, F.silu)),
    "--disable-bias-linear": (lambda c, m, o, s: c.add_bias_linear, False),
    "--normalization": (lambda c, m, o, s: c.normalization, "RMSNorm"),
    "--position-embedding-type": (lambda c, m, o, s: m.position_embedding_type, "rope"),
    "--rotary-base": (lambda c, m, o, s: m.rotary_base, 1000000),
    "--rotary-percent": (lambda c, m, o, s: m.rotary_pos_emb.inv_freq.numel() * 2, 8),  # half of head dim 16
    "--untie-embeddings-and-output-weights": (lambda c, m, o, s: m.share_embeddings_and_output_weights, False),
    "--num-experts": (lambda c, m, o, s: c.num_moe_experts, 4),
    "--moe-router-topk": (lambda c, m, o, s: c.moe_router_topk, 2),
    "--moe-aux-loss-coeff": (lambda c, m, o, s: c.moe_aux_loss_coeff, 1e-2),
    "--moe-router-load-balancing-type": (lambda c, m, o, s: c.moe_router_load_balancing_type, "aux_loss"),
    "--moe-token-dispatcher-type": (lambda c, m, o, s: c.moe_token_dispatcher_type, "alltoall"),
    "--bf16": (lambda c, m, o, s: (c.bf16, c.params_dtype), (True, torch.bfloat16)),
    "--lr": (lambda c, m, o, s: s.max_lr, 1.5e-4),
    "--min-lr": (lambda c, m, o, s: s.min_lr, 1e-5),
    "--lr-decay-style": (lambda c, m, o, s: s.lr_decay_style, "cosine"),
    "--lr-decay-iters": (lambda c, m, o, s: s.lr_decay_steps, 80),
    "--lr-warmup-iters": (lambda c, m, o, s: s.lr_warmup_steps, 5),
    "--train-samples": (lambda c, m, o, s: s.wd_incr_steps, 400),  # the schedule counts samples
    "--lr-decay-samples": (lambda c, m, o, s: s.lr_decay_steps, 390),
    "--lr-warmup-samples": (lambda c, m, o, s: s.lr_warmup_steps, 8),
    "--lr-warmup-fraction": (lambda c, m, o, s: s.lr_warmup_steps, 0.001 * 80),
    "--weight-decay": (lambda c, m, o, s: s.start_wd, 0.05),
    "--clip-grad": (lambda c, m, o, s: o.config.clip_grad, 0.5),
    "--adam-beta1": (lambda c, m, o, s: o.config.adam_beta1, 0.85),
    "--adam-beta2": (lambda c, m, o, s: o.config.adam_beta2, 0.9),
    # megatron-core's decoupled param group: exactly the input embedding and output layer (main copies
    # with --bf16, flattened: hence sizes), at their own peak and minimum
    "--decoupled-lr": (lambda c, m, o, s: sorted(p.numel() for g in o.param_groups if g["max_lr"] == 5e-4
                                                 for p in g["params"]) == sorted(
        p.numel() for p in m.parameters() if getattr(p, "is_embedding_or_output_parameter", False)), True),
    "--decoupled-min-lr": (lambda c, m, o, s: {g["min_lr"] for g in o.param_groups if g["max_lr"] == 5e-4}, {4.5e-5}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_megatron_lm_recipe_flags_are_honoured_or_refused_in_one_line(recipe, single_rank):
    flags = set(RECIPES[recipe].split())
    config = parse_args(recipe_argv(recipe), check=False)  # an unknown flag would exit here
    refusals = refused_flags(config) + environment_problems(config)
    assert all("\n" not in line and len(line) < 300 for line in refusals)
    refused = {leading_flag(line) for line in refusals}
    local = resolved_transformer_impl(config.model) == "local"
    assert refused == flags & (REFUSED | NEEDS_WANDB | (NEEDS_TE if local else set())), refusals
    if refusals:  # the parser itself stops at the first, in one line
        with pytest.raises(ValueError) as error:
            check_environment(parse_args(recipe_argv(recipe)))
        assert str(error.value) in refusals

    # FP8's settings go with --fp8-format (their own check: they need it)
    drop = refused | (FP8_SETTINGS if "--fp8-format" in refused else set()) \
        | ({"--wandb-exp-name"} if "--wandb-project" in refused else set())
    runnable = recipe_argv(recipe, drop=drop)
    if "--rampup-batch-size" in flags:  # the GPT-3 recipe ramps with --train-iters, which Megatron-LM asserts against
        with pytest.raises(ValueError, match="^--rampup-batch-size needs --train-samples"):
            parse_args(runnable)
        runnable = recipe_argv(recipe, drop=drop | {"--rampup-batch-size"})
    for tst in ([], ["--tst-bag-size", "6", "--tst-ratio", "0.3"]):
        config = parse_args(runnable + tst)
        check_environment(config)
        arch, model, model_config, optimizer, scheduler = dry_build(config)
        assert isinstance(model, TSTGPTModel) == bool(tst)
        checked = flags & HONOURED.keys()
        for flag in checked:
            read, expected = HONOURED[flag]
            assert read(model_config, model, optimizer, scheduler) == expected, flag
        assert checked, recipe
        assert sum(p.numel() for p in model.parameters()) == arch.parameter_counts()["total"]


def test_decoupled_lr_gives_the_embedding_and_output_layer_their_own_schedule(single_rank):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    schedule = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
                "--train-iters", "6"]
    config = parse_args(GPT3_STYLE + schedule + ["--untie-embeddings-and-output-weights", "--decoupled-lr", "3e-3",
                                                 "--decoupled-min-lr", "2e-4"])
    _, model, _, optimizer, scheduler = dry_build(config)
    decoupled = {id(model.embedding.word_embeddings.weight), id(model.output_layer.weight)}
    groups = {bool(decoupled & {id(p) for p in group["params"]}): group for group in optimizer.param_groups
              if group["params"]}
    assert set(groups) == {True, False}
    assert {id(p) for p in groups[True]["params"]} == decoupled  # nothing else in the decoupled group

    def reference(max_lr, min_lr):  # megatron-core's scheduler with the decoupled values as its own
        sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        return OptimizerParamScheduler(sgd, init_lr=0.0, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=2,
                                       lr_decay_steps=6, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                       wd_incr_steps=6, wd_incr_style="constant")

    references = {True: reference(3e-3, 2e-4), False: reference(1e-3, 1e-4)}
    for _ in range(6):
        scheduler.step(increment=1)
        for key, ref in references.items():
            ref.step(increment=1)
            assert groups[key]["lr"] == pytest.approx(ref.optimizer.param_groups[0]["lr"], rel=1e-12, abs=0)
    assert groups[True]["lr"] == pytest.approx(2e-4) and groups[False]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="^--decoupled-min-lr needs --decoupled-lr"):
        parse_args(GPT3_STYLE + ["--decoupled-min-lr", "1e-5"])


def test_profile_writes_a_torch_profiler_trace_of_the_steps_asked_for(corpus, tmp_path):
    traced = tmp_path / "run" / "profile"  # without --tensorboard-dir (not installed here): <save>/profile
    argv = ["--model-preset", "tiny", "--vocab-size", "511", "--tokenizer-type", "NullTokenizer", "--data-path",
            corpus, "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters",
            "4", "--profile", "--profile-step-start", "1", "--profile-step-end", "3"]
    assert pretrain.main(argv + ["--save", str(tmp_path / "run"), "--profile-ranks", "0"]) == 0
    traces = list(traced.glob("*.pt.trace.json"))
    assert len(traces) == 1  # tensorboard_trace_handler's file, as Megatron-LM writes it
    with open(traces[0]) as handle:
        names = {event.get("name") for event in json.load(handle)["traceEvents"]}
    steps = sorted(name for name in names if name and name.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"]  # Megatron-LM's schedule: start .. end - 1
    assert "aten::mm" in names or "aten::addmm" in names
    for flags, message in ((["--profile-step-end", "3"], "^--profile-step-end needs --profile"),
                           (["--profile", "--profile-step-start", "3", "--profile-step-end", "3"], "need 0 <= start < end"),
                           (["--profile"], "^--profile writes its trace to --tensorboard-dir")):
        with pytest.raises(ValueError, match=message):
            parse_args(GPT3_STYLE + flags)


def test_mock_data_runs_both_phases_on_megatron_core_synthetic_documents_and_num_workers_reads_the_same(tmp_path):
    from megatron_tst.data import DataConfig, TSTData
    from megatron_tst.tst import TSTPlan

    save = str(tmp_path / "run")
    argv = ["--model-preset", "tiny", "--vocab-size", "511", "--tokenizer-type", "NullTokenizer", "--mock-data",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "4",
            "--log-interval", "1", "--tst-bag-size", "2", "--tst-ratio", "0.5", "--save", save]
    assert pretrain.main(argv) == 0
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        rows = [row for row in map(json.loads, handle) if "loss" in row]
    assert [row["phase"] for row in rows] == ["superposition"] * 2 + ["recovery"] * 2
    assert all(math.isfinite(row["loss"]) for row in rows)
    # the samples are spans of MockGPTLowLevelDataset's documents (1, 2, 3, ... mod vocab, then EOD),
    # disjoint between phases, bags folded in phase 1
    plan = TSTPlan(bag_size=2, total_iters=4, ratio=0.5)
    data = TSTData(DataConfig(data_path=[], seq_length=16, global_batch_size=2, vocab_size=512, eod=511, mock=True),
                   plan)
    for phase, width in (("superposition", 2 * 16 + 1), ("recovery", 16 + 1)):
        raw = [data.train[phase][i]["tokens"].tolist() + [int(data.train[phase][i]["labels"][-1])] for i in range(4)]
        assert all(len(tokens) == width for tokens in raw)
        assert all(b == (a + 1) % 512 or b == 511 or (a == 511 and b == 1) for tokens in raw
                   for a, b in zip(tokens, tokens[1:]))
    assert data.sample("superposition", 0)["tokens"].shape == (16, 2)
    first, second = (set(data.train[phase].indices.tolist()) for phase in ("superposition", "recovery"))
    assert first and second and not first & second
    # --num-workers: the same run, its samples read in DataLoader worker processes; in a fresh process
    # as a user runs it (workers forked from this test process inherit every earlier test's threads)
    workers = str(tmp_path / "workers")
    subprocess.run([sys.executable, "-m", "megatron_tst.pretrain", *[a if a != save else workers for a in argv],
                    "--num-workers", "2"], check=True, capture_output=True, timeout=300)
    with open(os.path.join(workers, "metrics.jsonl")) as handle:
        assert [row["loss"] for row in map(json.loads, handle) if "loss" in row] == [row["loss"] for row in rows]
    with pytest.raises(ValueError, match="^--mock-data and --data-path contradict each other"):
        parse_args(GPT3_STYLE + ["--mock-data", "--data-path", "x"])


def test_gpt2_bpe_tokenizer_from_vocab_and_merge_files_preprocesses_and_trains(tmp_path, capsys):
    """Megatron-LM's GPT2BPETokenizer (--vocab-file --merge-file; the GPT-3 recipe gives no --tokenizer-type)
    against transformers' pure-Python GPT2Tokenizer, the same byte-level BPE as Megatron-LM's own."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    from megatron_tst.data.tokenizers import load_tokenizer
    from tests.test_tools import preprocess_data

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog's", "42", "naïve", "café", "7"]
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=generator).tolist())
             + ("\n\n  tail" if n % 3 == 0 else "") for n in range(120)]
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(tmp_path))
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    ours, reference = load_tokenizer("GPT2BPETokenizer", None, vocab_file=vocab, merge_file=merges), \
        GPT2Tokenizer(vocab, merges)
    assert ours.tokenize_batch(texts[:20]) == [reference.encode(text) for text in texts[:20]]
    assert ours.tokenize("it's 12 dogs  over\tthe cafés!") == reference.encode("it's 12 dogs  over\tthe cafés!")
    with open(vocab) as handle:
        encoder = json.load(handle)
    assert (ours.vocab_size, ours.eod) == (len(encoder), encoder["<|endoftext|>"])  # Megatron-LM's definitions
    assert ours.detokenize(ours.tokenize(texts[3])) == texts[3]

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    prefix = str(tmp_path / "gpt2")
    assert preprocess_data.main(["--input", str(corpus), "--output-prefix", prefix, "--tokenizer-type",
                                 "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, "--append-eod"]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix + "_text_document")
    assert [indexed[i].tolist() for i in range(3)] == [reference.encode(t) + [ours.eod] for t in texts[:3]]
    save = str(tmp_path / "run")
    argv = ["--model-preset", "tiny", "--data-path", prefix + "_text_document", "--vocab-file", vocab,
            "--merge-file", merges, "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "3", "--log-interval", "1", "--save", save]
    assert pretrain.main(argv) == 0
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        assert len([row for row in map(json.loads, handle) if math.isfinite(row.get("loss", math.nan))]) == 3
    with open(os.path.join(save, "iter_0000003", "run_config.json")) as handle:
        run_config = json.load(handle)
    assert (run_config["model"]["vocab_size"], run_config["tokenizer"]["type"]) == (ours.vocab_size, "GPT2BPETokenizer")
    # the HF export writes the recorded pair as transformers' GPT2TokenizerFast, Megatron-LM's ids and EOD
    from transformers import AutoConfig, AutoTokenizer, GPT2TokenizerFast

    from megatron_tst.hf_conversion import to_hf

    exported = to_hf(save, str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(exported)
    assert isinstance(hf, GPT2TokenizerFast) and hf.eos_token_id == AutoConfig.from_pretrained(exported).eos_token_id
    assert [hf(text)["input_ids"] for text in texts[:20]] == ours.tokenize_batch(texts[:20])
    assert hf.eos_token_id == ours.eod and hf.decode(ours.tokenize(texts[3])) == texts[3]
    with pytest.raises(ValueError, match=f"^--vocab-size 999 differs from the GPT2BPETokenizer's vocabulary of "
                                         f"{ours.vocab_size}; drop --vocab-size"):  # Megatron-LM would ignore it
        pretrain.tokenizer_info(parse_args(argv + ["--vocab-size", "999"]))
    for flags, message in ((["--tokenizer-type", "BertWordPieceCase"],
                            "^--tokenizer-type BertWordPieceCase is not supported: a BERT WordPiece tokenizer"),
                           (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab], "needs --vocab-file and --merge-file"),
                           (["--tokenizer-type", "SentencePieceTokenizer", "--merge-file", merges],
                            "^--vocab-file/--merge-file go with --tokenizer-type GPT2BPETokenizer")):
        with pytest.raises(ValueError, match=message):
            parse_args(GPT3_STYLE + flags)


def test_null_tokenizer_is_megatron_lm_s_vocabulary_n_plus_one_eod_n(tmp_path):
    """--tokenizer-type NullTokenizer --vocab-size N as Megatron-LM builds it (megatron-core's build_tokenizer,
    what its preprocess_data.py uses; its training's _NullTokenizer has the same definition): in training,
    in our preprocess_data.py and in the .bin dtype."""
    from types import SimpleNamespace

    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    from megatron_tst.models import preset
    from tests.test_tools import preprocess_data

    reference = build_tokenizer(SimpleNamespace(tokenizer_type="NullTokenizer", vocab_size=300))
    config = parse_args(["--model-preset", "tiny", "--seq-length", "16", "--mock-data", "--tokenizer-type",
                         "NullTokenizer", "--vocab-size", "300"])
    assert pretrain.tokenizer_info(config) == (reference.vocab_size, reference.eod)
    assert config.model.architecture(vocab_size=reference.vocab_size).vocab_size == reference.vocab_size
    texts = ["1 2 3", "299 0 7 8"]
    corpus = tmp_path / "null.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    argv = ["--input", str(corpus), "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--append-eod"]
    assert preprocess_data.main(argv + ["--output-prefix", str(tmp_path / "null")]) == 0
    indexed = IndexedDataset(str(tmp_path / "null_text_document"))
    assert [indexed[i].tolist() for i in range(2)] == [reference.tokenize(t) + [reference.eod] for t in texts]
    assert indexed.index.dtype == DType.optimal_dtype(reference.vocab_size)
    corpus.write_text(json.dumps({"text": "1 301"}) + "\n")  # beyond the vocabulary
    assert preprocess_data.main(argv + ["--output-prefix", str(tmp_path / "bad")]) == 1
    # without --vocab-size a preset's vocabulary is kept, its last id the EOD; without either, refused
    tiny = preset("tiny").vocab_size
    assert pretrain.tokenizer_info(parse_args(["--model-preset", "tiny", "--seq-length", "16", "--mock-data"])) \
        == (tiny, tiny - 1)
    at = GPT3_STYLE.index("--vocab-size")
    with pytest.raises(ValueError, match="^NullTokenizer needs --vocab-size N"):
        pretrain.tokenizer_info(parse_args(GPT3_STYLE[:at] + GPT3_STYLE[at + 2:] + ["--mock-data", "--tokenizer-type",
                                                                                   "NullTokenizer"]))


def test_tiktokenizer_with_a_local_vocabulary_is_megatron_core_s_and_trains(tmp_path, capsys):
    """TikTokenizer as Megatron-LM's pretrain_gpt.py and preprocess_data.py build it (megatron-core's): the ids
    against tiktoken itself, ranks shifted past the special tokens, --tiktoken-pattern v1/v2 honoured,
    EOD </s>; preprocessed and trained a few steps."""
    tiktoken = pytest.importorskip("tiktoken")
    import base64

    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import (
        _PATTERN_TIKTOKEN_V1, _PATTERN_TIKTOKEN_V2, SPECIAL_TOKENS,
    )

    from megatron_tst.data.tokenizers import load_tokenizer
    from tests.test_tools import preprocess_data

    # "eT" ranks first: v1 keeps "theTHE" one piece (t h eT ...), v2 splits it at the case change (the THE)
    ranks = [bytes([i]) for i in range(256)] + [b"eT", b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a",
                                                b"an", b"and", b"12", b"og"]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                                  "token_str": t.decode("utf-8", "replace")} for i, t in enumerate(ranks)]))
    special, reserved = SPECIAL_TOKENS + ["<|extra|>"], 10
    size = reserved + len(ranks)
    words = ["the", "thing", "and", "a", "theTHE", "12", "dog", "naïve", "café", "ing", "\n\n"]
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (30,), generator=generator).tolist())
             for _ in range(80)]
    tokenized = {}
    for pattern, regex in (("v1", _PATTERN_TIKTOKEN_V1), ("v2", _PATTERN_TIKTOKEN_V2)):
        ours = load_tokenizer("TikTokenizer", str(vocab), vocab_size=size, tiktoken_pattern=pattern,
                              tiktoken_num_special_tokens=reserved, special_tokens=special)
        reference = tiktoken.Encoding(name="reference", pat_str=regex, special_tokens={},
                                      mergeable_ranks={token: i + reserved for i, token in enumerate(ranks)})
        tokenized[pattern] = [ours.tokenize(text) for text in texts]
        assert tokenized[pattern] == [reference.encode_ordinary(text) for text in texts]
        assert (ours.vocab_size, ours.eod) == (size, special.index("</s>"))
        assert ours.tokenize("a</s>") == reference.encode_ordinary("a") + [ours.eod]  # special tokens in text
    assert tokenized["v1"] != tokenized["v2"]

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(vocab), "--tiktoken-pattern", "v2",
             "--tiktoken-num-special-tokens", str(reserved), "--vocab-size", str(size),
             "--tokenizer-special-tokens", *special]
    prefix = str(tmp_path / "tik")
    assert preprocess_data.main(["--input", str(corpus), "--output-prefix", prefix, "--append-eod", *flags]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix + "_text_document")
    assert [indexed[i].tolist() for i in range(3)] == [ids + [special.index("</s>")] for ids in tokenized["v2"][:3]]
    save = str(tmp_path / "run")
    assert pretrain.main(["--model-preset", "tiny", "--data-path", prefix + "_text_document", "--seq-length", "16",
                          "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                          "--log-interval", "1", "--save", save, *flags]) == 0
    with open(os.path.join(save, "iter_0000002", "run_config.json")) as handle:
        assert json.load(handle)["model"]["vocab_size"] == size
    capsys.readouterr()
    resumed = ["--model-preset", "tiny", "--data-path", prefix + "_text_document", "--seq-length", "16",
               "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--save", save]
    assert pretrain.main(resumed + [flag if flag != "v2" else "v1" for flag in flags]) == 1  # other ids
    assert "tokenizer.settings.pattern is 'v1' but the checkpoint was made with 'v2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="^TikTokenizer: --vocab-size 300 minus 10 special tokens needs 290 ranks"):
        load_tokenizer("TikTokenizer", str(vocab), vocab_size=300, tiktoken_pattern="v2",
                       tiktoken_num_special_tokens=reserved)
    for given, message in ((["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(vocab)],
                            "^--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2"),
                           (["--tokenizer-type", "NullTokenizer", "--tiktoken-num-special-tokens", "10"],
                            "^--tiktoken-num-special-tokens is read here only by --tokenizer-type TikTokenizer"),
                           (["--tokenizer-type", "MultimodalTokenizer"],
                            "^--tokenizer-type MultimodalTokenizer is not supported: a multimodal"),
                           (["--vocab-extra-ids", "100"], "^--vocab-extra-ids: T5's span-masking ids"),
                           (["--tokenizer-sentencepiece-legacy"], "^--tokenizer-sentencepiece-legacy: ")):
        with pytest.raises(ValueError, match=message):
            parse_args(GPT3_STYLE + given)


MOCK_TINY = ["--model-preset", "tiny", "--vocab-size", "511", "--tokenizer-type", "NullTokenizer", "--mock-data",
             "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
             "--log-interval", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]


def test_fp16_loss_scaling_skips_overflowing_steps_and_follows_megatron_core_scaler_semantics(tmp_path):
    from megatron_tst import parallel
    from megatron_tst.pretrain import StopFlags, build_data, resume, setup, train_step

    def losses(save, *extra):
        assert pretrain.main(MOCK_TINY + ["--train-iters", "3", "--save", save, *extra]) == 0
        with open(os.path.join(save, "metrics.jsonl")) as handle:
            return [row for row in map(json.loads, handle) if "loss" in row]

    # a scale small enough not to overflow: fp16 trains as fp32 does, within fp16's precision
    fp32, fp16 = losses(str(tmp_path / "fp32")), losses(str(tmp_path / "fp16"), "--fp16", "--initial-loss-scale", "256")
    assert all(row["grad_norm"] is not None for row in fp16)  # no step skipped
    assert [row["loss"] for row in fp16] == pytest.approx([row["loss"] for row in fp32], rel=5e-3)
    assert [row["grad_norm"] for row in fp16] == pytest.approx([row["grad_norm"] for row in fp32], rel=2e-2)

    # dynamic scaling from 2**16 (overflows here), hysteresis 2, window 2: Megatron-LM's DynamicGradScaler semantics
    config = parse_args(MOCK_TINY + ["--train-iters", "12", "--fp16", "--initial-loss-scale", str(2 ** 16),
                                     "--hysteresis", "2", "--loss-scale-window", "2", "--min-loss-scale", "1"])
    run = setup(config)
    try:
        resume(run)
        run.data = build_data(run)
        iterators = [run.data.micro_batches("next-token", 0, 2)]
        stop, scale, hysteresis, good = StopFlags(), 2.0 ** 16, 2, 0
        skipped, grown = 0, 0
        for _ in range(12):
            before = [p.detach().clone() for p in run.modules[0].parameters()]
            steps_before = run.scheduler.num_steps
            assert run.optimizer.get_loss_scale().item() == scale
            _, grad_norm, _ = train_step(run, iterators, "next-token", stop)
            changed = any(not torch.equal(a, b) for a, b in zip(before, run.modules[0].parameters()))
            overflow = grad_norm is None
            assert changed != overflow and (run.scheduler.num_steps == steps_before) == overflow
            if overflow:  # skipped; the scale halves once `hysteresis` overflows have been seen
                good, hysteresis = 0, hysteresis - 1
                if hysteresis <= 0:
                    scale = max(scale * 0.5, 1.0)
                skipped += 1
            else:  # a window of good steps doubles it and restores the hysteresis
                good += 1
                if good == 2:
                    good, hysteresis, scale = 0, 2, scale * 2
                    grown += 1
        assert run.optimizer.get_loss_scale().item() == scale
        assert skipped >= 2 and grown >= 1 and run.iteration == 12
    finally:
        parallel.shutdown()
    for flags, message in ((["--fp16", "--bf16"], "^--fp16 and --bf16 contradict each other"),
                           (["--loss-scale", "8"], "^--loss-scale is fp16 loss scaling: give --fp16"),
                           (["--fp16", "--loss-scale", "0"], "^--loss-scale must be > 0")):
        with pytest.raises(ValueError, match=message):
            parse_args(GPT3_STYLE + flags)


def test_rampup_batch_size_grows_the_global_batch_by_megatron_lm_formula_across_both_phases(tmp_path):
    save = str(tmp_path / "run")
    argv = MOCK_TINY + ["--global-batch-size", "8", "--train-samples", "60", "--rampup-batch-size", "2", "2", "20",
                        "--tst-bag-size", "2", "--tst-ratio", "0.5", "--save", save]  # the last --global-batch-size wins
    assert pretrain.main(argv) == 0

    def megatron_lm(consumed, start=2, increment=2, ramp=20, final=8):  # num_microbatches_calculator's formula
        if consumed > ramp:
            return final
        return start + int(consumed / (ramp / ((final - start) // increment))) * increment

    expected, consumed = [], 0
    while consumed <= 20:  # Megatron-LM's update_train_iters: ramp steps, then whole final batches
        expected.append(megatron_lm(consumed))
        consumed += expected[-1]
    expected += [8] * ((60 - consumed) // 8)
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        rows = [row for row in map(json.loads, handle) if "loss" in row]
    positions = [b["latent_positions"] - a["latent_positions"] for a, b in zip([{"latent_positions": 0}] + rows, rows)]
    assert [p // 16 for p in positions] == expected == [2, 2, 2, 2, 4, 4, 6, 8, 8, 8, 8]
    assert [row["phase"] for row in rows] == ["superposition"] * 6 + ["recovery"] * 5  # the switch in steps
    raw = [b["raw_tokens"] - a["raw_tokens"] for a, b in zip([{"raw_tokens": 0}] + rows, rows)]
    assert raw == [size * 16 * (2 if step < 6 else 1) for step, size in enumerate(expected)]  # phase 1: bags of 2
    for flags, message in ((["--rampup-batch-size", "2", "2", "20", "--train-iters", "5"],
                            "^--rampup-batch-size needs --train-samples"),
                           (["--rampup-batch-size", "3", "2", "20", "--train-samples", "80", "--global-batch-size", "8"],
                            "^--rampup-batch-size 3 2 20: need 0 < START < --global-batch-size 8, INCR > 0 dividing")):
        with pytest.raises(ValueError, match=message):
            parse_args(GPT3_STYLE + flags)


@pytest.mark.parametrize("distributed", [False, True], ids=["fp16", "fp16-distributed-optimizer"])
def test_fp16_and_rampup_resume_bit_identically_from_a_checkpoint_saved_before_any_update(tmp_path, distributed):
    """fp16's first steps overflow (skipped: Adam has no state yet); the ramp, the phase switch and
    --decoupled-lr's param groups continue from the checkpoint. With megatron-core's distributed
    optimizer the cut comes after four skipped steps and two updates: the loss scale and both LR
    groups are restored (megatron-core 0.16.1 alone gives every weight the decoupled LR there,
    and fails to load the plain optimizer's groups: optimizer.mark_decoupled_groups)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_tst import parallel
    from megatron_tst.pretrain import resume, setup

    argv = MOCK_TINY + ["--global-batch-size", "8", "--train-samples", "60", "--rampup-batch-size", "2", "2", "20",
                        "--tst-bag-size", "2", "--tst-ratio", "0.5", "--fp16", "--initial-loss-scale", "65536",
                        "--hysteresis", "1", "--loss-scale-window", "3", "--decoupled-lr", "3e-3",
                        "--decoupled-min-lr", "2e-4", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
                        "--lr-warmup-samples", "4"] + (["--use-distributed-optimizer"] if distributed else [])
    cut_at = 6 if distributed else 3

    def rows(save):
        with open(os.path.join(save, "metrics.jsonl")) as handle:
            return [(r["loss"], r["latent_positions"], r["grad_norm"]) for r in map(json.loads, handle) if "loss" in r]

    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert pretrain.main(argv + ["--save", whole]) == 0
    assert pretrain.main(argv + ["--save", cut, "--exit-interval", str(cut_at)]) == 0
    before = rows(cut)
    assert [grad_norm is None for _, _, grad_norm in before] == ([True] * 4 + [False] * 2 if distributed else [True] * 3)
    if distributed:  # what the checkpoint gives back, against Megatron-LM's scaler and megatron-core's scheduler
        scale, good, updated, previous = 65536.0, 0, 0, 0
        for _, positions, grad_norm in before:
            if grad_norm is None:  # hysteresis 1: every overflow halves the scale
                scale, good = scale / 2, 0
            else:  # skipped steps do not advance the LR schedule, which counts samples
                updated += (positions - previous) // 16
                good += 1
                if good == 3:
                    scale, good = scale * 2, 0
            previous = positions
        run = setup(parse_args(argv + ["--save", cut]))
        try:
            resume(run)
            assert run.iteration == cut_at and run.optimizer.get_loss_scale().item() == scale == 4096
            assert run.scheduler.num_steps == updated == 8
            # the decoupled group holds exactly the input embedding and output layer (fp32 main shards: sizes)
            groups = [group for group in run.optimizer.param_groups if group["params"]]
            assert sum(p.numel() for g in groups if g["max_lr"] == 3e-3 for p in g["params"]) == sum(
                p.numel() for p in run.modules[0].parameters() if getattr(p, "is_embedding_or_output_parameter", 0))
            for max_lr, min_lr in ((3e-3, 2e-4), (1e-3, 1e-4)):
                reference = OptimizerParamScheduler(
                    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), init_lr=0.0, max_lr=max_lr,
                    min_lr=min_lr, lr_warmup_steps=4, lr_decay_steps=60, lr_decay_style="cosine", start_wd=0.01,
                    end_wd=0.01, wd_incr_steps=60, wd_incr_style="constant")
                reference.step(increment=updated)
                lrs = [group["lr"] for group in groups if group["max_lr"] == max_lr]
                assert lrs and lrs == pytest.approx([reference.optimizer.param_groups[0]["lr"]] * len(lrs),
                                                    rel=1e-12, abs=0), max_lr
        finally:
            parallel.shutdown()
    assert pretrain.main(argv + ["--save", cut]) == 0
    assert rows(cut) == rows(whole) and len(rows(whole)) == 11


def test_no_op_and_refused_flags_say_so_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--use-mcore-models accepted, no effect" in text
    assert "--calculate-per-token-loss accepted, no effect" in text
    assert "--no-mmap-bin-files refused: not supported yet" in text
    assert "other tokenizers do not read it, as in Megatron-LM" in text  # --tiktoken-pattern (the Llama-3 recipe's)


GPT3_STYLE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
              "--max-position-embeddings", "48", "--vocab-size", "512", "--init-method-std", "0.006"]


def test_without_a_preset_the_model_is_megatron_lm_gpt_as_megatron_core_builds_it(single_rank):
    config = parse_args(GPT3_STYLE)
    arch = config.model.architecture()
    assert (arch.normalization, arch.swiglu, arch.position_embedding_type, arch.add_bias_linear,
            arch.untie_embeddings_and_output_weights, arch.ffn_hidden_size, arch.rotary_base) == \
        ("LayerNorm", False, "learned_absolute", True, False, 256, 10000)
    # megatron-core's own local spec has its DotProductAttention: ours is that with --attention-backend local
    # (the default, torch SDPA, is checked against it in tests/test_attention.py)
    ours_config = transformer_config(arch, attention_backend="local", **config.model.dropouts())
    # megatron-core's own defaults (Megatron-LM's), only the sizes given
    reference_config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, init_method_std=0.006,
                                         use_cpu_initialization=True, attention_backend=AttnBackend.local)
    for name in ("normalization", "gated_linear_unit", "activation_func", "add_bias_linear", "ffn_hidden_size",
                 "num_query_groups", "kv_channels", "hidden_dropout", "attention_dropout", "layernorm_epsilon",
                 "layernorm_zero_centered_gamma", "init_method_std"):
        assert getattr(ours_config, name) == getattr(reference_config, name), name

    def seeded(build):
        torch.manual_seed(3)
        model_parallel_cuda_manual_seed(3)
        return build()

    ours = seeded(lambda: build_gpt_model(arch, ours_config, tst=False, seq_length=32))
    # as Megatron-LM's pretrain_gpt.py builds it (tied unless --untie-embeddings-and-output-weights)
    reference = seeded(lambda: GPTModel(reference_config, get_gpt_layer_local_spec(), vocab_size=512,
                                        max_sequence_length=48, share_embeddings_and_output_weights=True))
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
    ours_params, reference_params = dict(ours.named_parameters()), dict(reference.named_parameters())
    assert list(ours_params) == list(reference_params)
    assert all(torch.equal(ours_params[n], reference_params[n]) for n in ours_params)
    assert "embedding.position_embeddings.weight" in ours_params and "output_layer.weight" not in ours_params
    total = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in ours.parameters()) == total == arch.parameter_counts()["total"]
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    ours.eval(), reference.eval()
    assert torch.equal(ours(tokens, positions, None), reference(tokens, positions, None))

    # the switches each give what Megatron-LM's flags give
    switched = parse_args(GPT3_STYLE + ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
                                        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                                        "--group-query-attention", "--attention-dropout", "0.2"])
    arch = switched.model.architecture()
    assert (arch.normalization, arch.swiglu, arch.position_embedding_type, arch.add_bias_linear,
            arch.untie_embeddings_and_output_weights, arch.ffn_hidden_size, arch.num_query_groups) == \
        ("RMSNorm", True, "rope", False, True, 128, 1)  # int(4h * 2/3 / 64) * 64; GQA alone: one group
    assert switched.model.dropouts() == {"hidden_dropout": 0.1, "attention_dropout": 0.2}
    # presets keep the paper's Llama shape and no dropout
    tiny = parse_args(["--model-preset", "tiny", "--seq-length", "32"])
    arch = tiny.model.architecture()
    assert (arch.normalization, arch.swiglu, arch.position_embedding_type, arch.add_bias_linear) == \
        ("RMSNorm", True, "rope", False)
    assert tiny.model.dropouts() == {"hidden_dropout": 0.0, "attention_dropout": 0.0}


@pytest.mark.parametrize("flags, message", [
    (["--normalization", "Foo"], "--normalization Foo is not supported; use LayerNorm or RMSNorm"),
    (["--position-embedding-type", "relative"], "--position-embedding-type relative is not supported"),
    (["--no-position-embedding"], "--no-position-embedding (no learned position table) needs --position-embedding-type rope"),
    (["--fp8-param-gather"], "--fp8-param-gather needs --fp8-format"),
    (["--ckpt-format", "torch"], "--ckpt-format torch is not supported; use torch_dist"),
    (["--rotary-percent", "1.5"], "--rotary-percent must be in (0, 1]"),
])
def test_bad_model_flags_are_one_line_errors(flags, message):
    with pytest.raises(ValueError) as error:
        parse_args(GPT3_STYLE + flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_hf_export_refuses_a_shape_it_cannot_express():
    from megatron_tst.hf_conversion import ConversionError, pick_model_type

    gpt = dataclasses.asdict(parse_args(GPT3_STYLE).model.architecture())
    with pytest.raises(ConversionError, match="^normalization: the checkpoint has normalization='LayerNorm'"):
        pick_model_type(gpt)
    for key, value in (("swiglu", False), ("add_bias_linear", True), ("position_embedding_type", "learned_absolute"),
                       ("apply_layernorm_1p", True), ("rotary_percent", 0.5)):
        llama = dataclasses.asdict(parse_args(["--model-preset", "tiny", "--seq-length", "32"]).model.architecture())
        with pytest.raises(ConversionError, match=f"^{key}: "):
            pick_model_type(dict(llama, **{key: value}))
    old = {k: v for k, v in llama.items() if k not in ("normalization", "swiglu", "position_embedding_type",
                                                       "add_bias_linear", "apply_layernorm_1p", "rotary_percent")}
    assert pick_model_type(old) == "llama"  # a run_config from before these fields


def test_no_load_optim_no_load_rng_and_finetune_resume_as_megatron_lm(corpus, tmp_path):
    from megatron_tst import parallel
    from megatron_tst.pretrain import adam_moments, resume, setup

    save = str(tmp_path / "run")
    argv = ["--model-preset", "tiny", "--hidden-dropout", "0.1", "--vocab-size", "511", "--tokenizer-type",
            "NullTokenizer", "--data-path", corpus, "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "4", "--lr-warmup-iters", "2", "--save", save]
    assert pretrain.main(argv + ["--exit-interval", "2"]) == 0
    saved_rng = torch.load(os.path.join(save, "iter_0000002", "rng", "rank_0.pt"), weights_only=False)["torch"]

    def resumed(*extra):
        run = setup(parse_args(argv + list(extra)))
        try:
            resume(run)
            params = [p for p in run.modules[0].parameters()]
            return dict(iteration=run.iteration, consumed=run.consumed, steps=run.scheduler.num_steps,
                        moments=len(adam_moments(run.optimizer, params)), rng=torch.get_rng_state(),
                        weights=[p.detach().clone() for p in params])
        finally:
            parallel.shutdown()

    full = resumed()
    assert (full["iteration"], full["consumed"], full["steps"]) == (2, {"next-token": 4}, 2)
    assert full["moments"] > 0 and torch.equal(full["rng"], saved_rng)
    no_optim = resumed("--no-load-optim")  # fresh Adam state, the schedule and data position continue
    assert (no_optim["iteration"], no_optim["steps"], no_optim["moments"]) == (2, 2, 0)
    assert all(torch.equal(a, b) for a, b in zip(no_optim["weights"], full["weights"]))
    assert not torch.equal(resumed("--no-load-rng")["rng"], saved_rng)
    # --finetune: --load's weights in a fresh run under another --save; that run resumes itself later
    finetune = resumed("--load", save, "--save", str(tmp_path / "finetuned"), "--finetune")
    assert (finetune["iteration"], finetune["consumed"], finetune["steps"], finetune["moments"]) == (0, {}, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(finetune["weights"], full["weights"]))


def test_exit_duration_saves_and_stops_and_the_same_command_resumes_bit_identically(corpus, tmp_path, capsys,
                                                                                   monkeypatch):
    """Also --log-throughput (Megatron-LM's TFLOP/s per GPU) and --manual-gc on the uninterrupted run."""
    common = ["--model-preset", "tiny", "--hidden-dropout", "0.1", "--vocab-size", "511", "--tokenizer-type",
              "NullTokenizer", "--data-path", corpus, "--seq-length", "16", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1"]

    def losses(save):
        with open(os.path.join(save, "metrics.jsonl")) as handle:
            return [row["loss"] for row in map(json.loads, handle) if "loss" in row]

    whole = str(tmp_path / "whole")
    collections, collect = [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(gc.isenabled()) or collect(*a))
    assert pretrain.main(common + ["--save", whole, "--log-throughput", "--manual-gc", "--manual-gc-interval", "2"]) == 0
    monkeypatch.undo()
    # collected at the start and after step 2 with the automatic collector off; on again afterwards
    assert len(collections) >= 2 and not any(collections) and gc.isenabled()
    with open(os.path.join(whole, "metrics.jsonl")) as handle:
        rows = [row for row in map(json.loads, handle) if "loss" in row]
    flops = [b["model_flops"] - a["model_flops"] for a, b in zip([{"model_flops": 0}] + rows, rows)]
    assert [row["tflops_per_gpu"] for row in rows] == pytest.approx(
        [f / row["step_time_s"] / 1e12 for f, row in zip(flops, rows)], rel=1e-9)
    assert "TFLOP/s/GPU" in capsys.readouterr().out
    stopped = str(tmp_path / "stopped")
    budget = common + ["--save", stopped, "--exit-duration-in-mins", "1e-9"]  # out of time after each first step
    for iteration in (1, 2, 3):
        assert pretrain.main(budget) == 0
        with open(os.path.join(stopped, "latest_checkpointed_iteration.txt")) as handle:
            assert handle.read().strip() == str(iteration)  # saved, then stopped
    assert losses(stopped) == losses(whole)  # dropout on: the RNG state resumes too
    assert len(losses(whole)) == 3


def test_sample_based_schedule_counts_samples_as_megatron_lm(corpus, tmp_path):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    common = ["--model-preset", "tiny", "--vocab-size", "511", "--tokenizer-type", "NullTokenizer", "--data-path",
              corpus, "--seq-length", "16", "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-3",
              "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--log-interval", "1"]

    def lrs(save, *schedule):
        assert pretrain.main(common + ["--save", save, *schedule]) == 0
        with open(os.path.join(save, "metrics.jsonl")) as handle:
            return [row["lr"] for row in map(json.loads, handle) if "lr" in row]

    def reference(iterations, increment, warmup, decay, total):  # megatron-core's scheduler, stepped as Megatron-LM
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=warmup, lr_decay_steps=decay,
            lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=total, wd_incr_style="constant")
        values = []
        for _ in range(iterations):
            scheduler.step(increment=increment)
            values.append(scheduler.get_lr(optimizer.param_groups[0]))
        return values

    # 99 samples of 8: 12 iterations (Megatron-LM's floor); warm-up and decay in samples, not multiples of 8
    samples = lrs(str(tmp_path / "samples"), "--train-samples", "99", "--lr-warmup-samples", "20",
                  "--lr-decay-samples", "70", "--tst-bag-size", "2", "--tst-iters", "3")
    assert samples == pytest.approx(reference(12, 8, 20, 70, 99), rel=1e-12, abs=0)
    fraction = lrs(str(tmp_path / "fraction"), "--train-iters", "6", "--lr-decay-iters", "5",
                   "--lr-warmup-fraction", "0.5")
    assert fraction == pytest.approx(reference(6, 1, 2.5, 5, 6), rel=1e-12, abs=0)
    config = parse_args(common + ["--train-samples", "1000", "--tst-bag-size", "6", "--tst-ratio", "0.3"])
    assert config.training.train_iters == 125 and config.tst.plan(125).switch_iter == 38  # the switch in steps


@pytest.mark.parametrize("flags, message", [
    (["--train-samples", "80", "--train-iters", "10"], "--train-samples and --train-iters contradict each other"),
    (["--train-samples", "80"], "--train-samples needs --global-batch-size"),
    (["--train-samples", "80", "--global-batch-size", "8", "--lr-decay-iters", "5"],
     "--lr-decay-iters with --train-samples: give --lr-decay-samples instead"),
    (["--lr-warmup-samples", "8"], "--lr-warmup-samples needs --train-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "--lr-warmup-fraction and --lr-warmup-iters"),
])
def test_bad_schedule_flags_are_one_line_errors(flags, message):
    with pytest.raises(ValueError) as error:
        parse_args(GPT3_STYLE + flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_from_before_the_architecture_fields_resumes(corpus, tmp_path, capsys):
    save = str(tmp_path / "run")
    argv = ["--model-preset", "tiny", "--vocab-size", "511", "--tokenizer-type", "NullTokenizer", "--data-path", corpus,
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3",
            "--save", save, "--save-interval", "2", "--log-interval", "1", "--exit-interval", "2"]
    assert pretrain.main(argv) == 0
    path = os.path.join(save, "iter_0000002", "run_config.json")
    with open(path) as handle:
        run_config = json.load(handle)
    new = ("normalization", "swiglu", "position_embedding_type", "add_bias_linear", "apply_layernorm_1p",
           "rotary_percent")
    assert set(new) <= set(run_config["model"])
    run_config["model"] = {k: v for k, v in run_config["model"].items() if k not in new}
    with open(path, "w") as handle:
        json.dump(run_config, handle)
    assert pretrain.main(argv[:-2]) == 0  # resumes to iteration 3
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        assert [json.loads(line)["iteration"] for line in handle if '"loss"' in line] == [1, 2, 3]
    # the same checkpoint under a Megatron-LM GPT flag set (LayerNorm, GeLU, ...) is another model
    other = [a for a in argv[:-2] if a not in ("--model-preset", "tiny")] + [
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--max-position-embeddings", "256", "--untie-embeddings-and-output-weights",
        "--rotary-base", "500000", "--train-iters", "4"]
    capsys.readouterr()
    assert pretrain.main(other) == 1
    assert "holds a model of another shape" in capsys.readouterr().err


def test_the_launcher_gives_the_recovery_job_what_is_left_of_the_exit_duration():
    import time

    from megatron_tst.launch import within_budget

    argv = ["--train-iters", "10", "--exit-duration-in-mins", "10", "--save", "x"]
    left = within_budget(argv, 10, time.time() - 150)
    assert left[:-2] == ["--train-iters", "10", "--save", "x"] and left[-2] == "--exit-duration-in-mins"
    assert float(left[-1]) == pytest.approx(7.5, abs=0.05)
    assert within_budget(argv, 10, time.time() - 601) is None
    assert within_budget(argv, None, time.time() - 601) == argv


@pytest.mark.parametrize("flags", [["--recompute-granularity", "selective"],
                                   ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                    "--recompute-num-layers", "1"],
                                   ["--recompute-granularity", "full", "--recompute-method", "block",
                                    "--recompute-num-layers", "2"]])
def test_recomputation_gives_the_same_losses_and_gradients_with_fewer_saved_activations(flags, single_rank):
    def step(extra):
        config = parse_args(["--model-preset", "tiny", "--seq-length", "32", "--vocab-size", "512"] + extra)
        arch = config.model.architecture()
        torch.manual_seed(5)
        model_parallel_cuda_manual_seed(5)
        model = build_gpt_model(arch, transformer_config(arch, **model_settings(config)), tst=True)
        tokens = torch.randint(0, 512, (2, 32, 3), generator=torch.Generator().manual_seed(1))  # bags, s = 3
        labels = torch.randint(0, 512, (2, 32, 3), generator=torch.Generator().manual_seed(2))
        saved = {}

        def pack(tensor):  # what autograd keeps for backward: the activation memory
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(tokens, torch.arange(32).expand(2, 32), None, labels=labels).sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved.values())

    plain_loss, plain_grads, plain_bytes = step([])
    loss, grads, saved_bytes = step(flags)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(grads[name], plain_grads[name]) for name in plain_grads)
    assert saved_bytes < plain_bytes


def test_bad_recompute_flags_are_one_line_errors():
    for flags, message in ((["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
                           (["--recompute-method", "block"], "--recompute-method/--recompute-num-layers need"),
                           (["--recompute-granularity", "some"], "--recompute-granularity some is not supported")):
        with pytest.raises(ValueError, match=message):
            parse_args(GPT3_STYLE + flags)
