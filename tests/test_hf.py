"""Hugging Face export / import end to end on CPU: models trained through the real training entry
at TP=2, PP=2 and EP=2 (distributed optimizer), exported with tools/convert_checkpoint.py to-hf and
loaded with transformers; compared with megatron-core on the same tokens."""

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_tst.arguments import parse_args
from megatron_tst.pretrain import pretrain
from tests.conftest import EOD, VOCAB
from tests.distributed import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # slow: two-process training runs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)
SEQ, MBS, EVAL_ITERS = 32, 4, 2
LAYOUTS = {
    "dense-tied-tp2": (["--model-preset", "tiny", "--tie-embeddings-and-output-weights",
                        "--tensor-model-parallel-size", "2"], "llama"),
    "dense-untied-pp2": (["--model-preset", "tiny", "--untie-embeddings-and-output-weights",
                          "--pipeline-model-parallel-size", "2"], "llama"),
    "moe-qknorm-ep2": (["--model-preset", "tiny-moe", "--qk-layernorm", "--untie-embeddings-and-output-weights",
                        "--expert-model-parallel-size", "2"], "qwen3_moe"),
}


def convert(*argv):
    """tools/convert_checkpoint.py: (exit code, its one error line, or all stderr when there is not
    exactly one). to-hf runs in this process (it needs no process group), from-hf in a fresh one."""
    if argv[0] == "to-hf":
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = convert_checkpoint.main(list(argv))
        stderr = stderr.getvalue()
    else:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *argv],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        code, stderr = done.returncode, done.stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ") or "Traceback" in line]
    return code, errors[-1] if len(errors) == 1 else stderr


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A word-level tokenizer.json for the arithmetic corpus: ids 0..510 are 't<i>', 511 is the EOD."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["<|endoftext|>"] = EOD
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    tokenizer.save(path)
    return path


def train_argv(corpus, tokenizer, save, layout, iters=6, lr="3e-3"):
    return [*LAYOUTS[layout][0], "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
            "--data-path", corpus, "--seq-length", str(SEQ), "--micro-batch-size", str(MBS),
            "--global-batch-size", "8", "--train-iters", str(iters), "--lr", lr, "--lr-warmup-iters", "1",
            "--log-interval", "1", "--eval-interval", str(iters), "--eval-iters", str(EVAL_ITERS),
            "--use-distributed-optimizer", "--save", save]


def _train(rank, world_size, argv):
    return pretrain(parse_args(argv))


@pytest.fixture(scope="module")
def trained(corpus, tokenizer_json, tmp_path_factory):
    """Each layout trained a few steps through the training entry, then exported (lazily, once)."""
    cache = {}

    def get(layout):
        if layout not in cache:
            root = tmp_path_factory.mktemp(layout)
            save, hf = str(root / "run"), str(root / "hf")
            run_distributed(_train, 2, train_argv(corpus, tokenizer_json, save, layout))
            code, error = convert("to-hf", "--input", save, "--output", hf, "--dtype", "fp32")
            assert code == 0, error
            cache[layout] = (save, hf)
        return cache[layout]
    return get


def _megatron_reference(rank, world_size, save, corpus, tokens, new_tokens):
    """In a fresh one-process world: megatron-core's logits for ``tokens``, its greedy continuation,
    and the validation samples the run evaluated on."""
    import dataclasses

    from megatron_tst import checkpointing, parallel
    from megatron_tst.data import DataConfig, TSTData
    from megatron_tst.models import GPTArchitecture, build_gpt_model, transformer_config

    parallel.initialize()
    run_config = checkpointing.read_run_config(save)
    arch = GPTArchitecture(**run_config["model"])
    model = build_gpt_model(arch, transformer_config(arch, transformer_impl="local"), tst=False)
    checkpointing.load(save, [model], None, None)
    model.eval()

    def logits_of(ids):
        with torch.no_grad():
            return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)[..., :arch.vocab_size]

    logits = logits_of(tokens)
    sequence = tokens[:1]
    for _ in range(new_tokens):
        sequence = torch.cat([sequence, logits_of(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    if corpus is None:
        return {"logits": logits, "greedy": sequence[0, tokens.shape[1]:]}
    data = TSTData(DataConfig(data_path=[corpus], seq_length=SEQ, global_batch_size=8,
                              vocab_size=VOCAB, eod=EOD, split="969,30,1", seed=1234),
                   None, total_iters=run_config["iteration"])
    layout = run_config["parallel"]  # each data-parallel rank evaluated EVAL_ITERS micro-batches of its own
    data_parallel = run_config["world_size"] // (layout["tensor_model_parallel_size"]
                                                 * layout["pipeline_model_parallel_size"])
    valid = [data.valid_sample(i) for i in range(EVAL_ITERS * MBS * data_parallel)]
    return {"logits": logits, "greedy": sequence[0, tokens.shape[1]:], "valid": valid,
            "arch": dataclasses.asdict(arch)}


def megatron_reference(save, corpus, tokens, new_tokens=20):
    return run_distributed(_megatron_reference, 1, save, corpus, tokens, new_tokens)[0]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def logged_validation_loss(save):
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return [r["validation_loss"] for r in rows if "validation_loss" in r][-1]


def hf_loss(model, samples):
    """Megatron's convention: the sum of next-token CEs over all valid targets / their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(sample["tokens"][None]).logits[0].double()
            labels = sample["labels"]
            valid = labels >= 0
            losses = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
            total, count = total + losses.item(), count + int(valid.sum())
    return total / count


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exported_model_matches_megatron(layout, trained, corpus):
    save, hf = trained(layout)
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["model_type"] == LAYOUTS[layout][1]
    assert config["tie_word_embeddings"] == (layout == "dense-tied-tp2")
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == EOD
    tokens = torch.from_numpy(np.random.RandomState(1).randint(1, 500, size=(2, 24)))
    reference = megatron_reference(save, corpus, tokens)
    model = hf_model(hf)
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == reference["logits"].shape
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4
    generated = model.generate(tokens[:1], max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated[0, tokens.shape[1]:].tolist() == reference["greedy"].tolist()
    assert hf_loss(model, reference["valid"]) == pytest.approx(logged_validation_loss(save), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_model_becomes_an_autotokenizer_with_the_same_ids(model_type, tmp_path):
    """tools/train_tokenizer.py's lossless SentencePiece model -> AutoTokenizer: SentencePiece's ids
    (Megatron's SentencePieceTokenizer), eos = its eod, no BOS added, decoding gives the text back."""
    import sentencepiece
    from transformers import AutoTokenizer

    from megatron_tst.hf_tokenizer import save_tokenizer

    sources = [os.path.join(os.path.dirname(json.__file__), name) for name in ("decoder.py", "encoder.py")]
    texts = [open(path).read() for path in sources]
    with open(tmp_path / "corpus.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    prefix = str(tmp_path / "sp")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                           str(tmp_path / "corpus.jsonl"), "--output-prefix", prefix, "--vocab-size", "400",
                           "--model-type", model_type], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ids = save_tokenizer("SentencePieceTokenizer", prefix + ".model", str(tmp_path / "hf"), 400)
    reference = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert ids["eos_token_id"] == tokenizer.eos_token_id == reference.eos_id()
    samples = texts + ["  two  spaces\n\n\ttab 12345 é ünïcødé 漢字 🙂 ", " leading", "trailing  ", "<s> </s> text", ""]
    for text in samples:
        assert tokenizer(text)["input_ids"] == reference.encode_as_ids(text)
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == reference.decode(reference.encode_as_ids(text))


def test_qwen3_dense_from_transformers_imports_and_exports_exactly(tokenizer_json, tmp_path):
    """A Qwen3 (dense, QK-norm, head_dim != hidden/heads, untied) made by transformers -> from-hf at
    TP=2 -> megatron-core gives transformers' logits and greedy tokens -> to-hf gives it back bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                         rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=EOD)
    original = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced norm weight shows
        for name, parameter in original.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    source, imported, again = (str(tmp_path / name) for name in ("qwen3", "imported", "again"))
    original.save_pretrained(source)
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, eos_token="<|endoftext|>").save_pretrained(source)
    code, error = convert("from-hf", "--input", source, "--output", imported, "--tensor-model-parallel-size", "2")
    assert code == 0, error
    tokens = torch.from_numpy(np.random.RandomState(2).randint(1, 500, size=(2, 20)))
    reference = run_distributed(_megatron_reference, 1, imported, None, tokens, 20)[0]
    with torch.no_grad():
        assert (original(tokens).logits - reference["logits"]).abs().max().item() <= 1e-4
    generated = original.generate(tokens[:1], max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated[0, tokens.shape[1]:].tolist() == reference["greedy"].tolist()
    code, error = convert("to-hf", "--input", imported, "--output", again)
    assert code == 0, error
    assert json.load(open(os.path.join(again, "config.json")))["model_type"] == "qwen3"
    first, second = load_file(os.path.join(source, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert sorted(first) == sorted(second) and all(torch.equal(first[name], second[name]) for name in first)


def test_tokenizer_round_trips_ids(trained, tokenizer_json):
    from transformers import AutoTokenizer

    _, hf = trained("dense-untied-pp2")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.eos_token_id == EOD
    assert tokenizer("t5 t17 t300 <|endoftext|>")["input_ids"] == [5, 17, 300, EOD]


@pytest.mark.parametrize("layout,layout_flags", [
    ("dense-untied-pp2", ["--tensor-model-parallel-size", "2"]),
    ("moe-qknorm-ep2", ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
])
def test_hf_to_megatron_to_hf_is_bit_identical(layout, layout_flags, trained, tmp_path):
    from safetensors.torch import load_file

    _, hf = trained(layout)
    imported, again = str(tmp_path / "imported"), str(tmp_path / "again")
    code, error = convert("from-hf", "--input", hf, "--output", imported, *layout_flags)
    assert code == 0, error
    code, error = convert("to-hf", "--input", imported, "--output", again)
    assert code == 0, error
    first, second = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert json.load(open(os.path.join(hf, "config.json"))) == json.load(open(os.path.join(again, "config.json")))


def test_imported_model_trains_at_tp_2_from_its_weights(trained, corpus, tokenizer_json, tmp_path):
    """from-hf at TP=2 -> --load in the training entry at TP=2: the run starts at iteration 0 from the
    imported weights (with lr 0 they stay bit-identical, and the logged validation loss is the HF one)."""
    from safetensors.torch import load_file

    _, hf = trained("dense-untied-pp2")
    imported, save, again = (str(tmp_path / name) for name in ("imported", "run", "again"))
    assert convert("from-hf", "--input", hf, "--output", imported, "--tensor-model-parallel-size", "2")[0] == 0
    argv = train_argv(corpus, tokenizer_json, save, "dense-untied-pp2", iters=2, lr="0")
    argv[argv.index("--pipeline-model-parallel-size")] = "--tensor-model-parallel-size"
    run_distributed(_train, 2, argv + ["--load", imported])
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2]
    code, error = convert("to-hf", "--input", save, "--output", again)
    assert code == 0, error
    first, second = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert all(torch.equal(first[name], second[name]) for name in first)
    samples = megatron_reference(save, corpus, torch.ones(1, 2, dtype=torch.long), new_tokens=0)["valid"]
    assert hf_loss(hf_model(again), samples) == pytest.approx(logged_validation_loss(save), rel=1e-5, abs=1e-5)


def test_bad_input_gives_one_line_errors_and_writes_nothing(trained, corpus, tmp_path):
    save, hf = trained("dense-untied-pp2")
    out = str(tmp_path / "out")

    def refused(*argv, message):
        code, error = convert(*argv)
        assert code == 1 and error.startswith("error: ") and "\n" not in error and message in error, error
        assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if ".tmp" in n]

    refused("to-hf", "--input", str(tmp_path), "--output", out, message="is not a megatron_tst torch_dist checkpoint")
    refused("to-hf", "--input", save, "--output", out, "--model-type", "gpt2", message="unknown --model-type 'gpt2'")
    refused("to-hf", "--input", save, "--output", out, "--model-type", "qwen3", message="qk_layernorm")
    refused("to-hf", "--input", save, "--output", out, "--tokenizer-model", str(tmp_path / "nope.json"),
            message="not found")
    refused("from-hf", "--input", save, "--output", out, message="has no config.json")
    os.makedirs(out)
    code, error = convert("to-hf", "--input", save, "--output", out)
    assert code == 1 and "already exists; remove it or pass --overwrite" in error
    os.rmdir(out)
    # a NullTokenizer run records no tokenizer
    import shutil
    null_run = str(tmp_path / "null")
    shutil.copytree(save, null_run)
    iteration_dir = os.path.join(null_run, sorted(n for n in os.listdir(null_run) if n.startswith("iter_"))[-1])
    config = json.load(open(os.path.join(iteration_dir, "run_config.json")))
    config["tokenizer"] = {"type": "NullTokenizer", "model": None}
    json.dump(config, open(os.path.join(iteration_dir, "run_config.json"), "w"))
    refused("to-hf", "--input", null_run, "--output", out, message="no tokenizer")
    # a truncated shard
    shard = os.path.join(iteration_dir, sorted(n for n in os.listdir(iteration_dir) if n.endswith(".distcp"))[0])
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    refused("to-hf", "--input", null_run, "--output", out, "--tokenizer-model", os.path.join(hf, "tokenizer.json"),
            message="truncated")
    # a phase-1 checkpoint
    config["tst"] = {"switch_iter": 100}
    json.dump(config, open(os.path.join(iteration_dir, "run_config.json"), "w"))
    refused("to-hf", "--input", null_run, "--output", out, message="not a next-token model yet")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (test extra)")
def test_lm_eval_harness_scores_an_exported_model_offline(trained, tmp_path):
    """lm_eval on a local task (a YAML over a local jsonl, no hub): its perplexity is the one the
    exported model gives the same continuations."""
    _, hf = trained("dense-untied-pp2")
    documents = [{"context": " ".join(f"t{start + 3 * i}" for i in range(6)), "target": f" t{start + 18}"}
                 for start in range(1, 25)]
    with open(tmp_path / "arith.jsonl", "w") as handle:
        handle.writelines(json.dumps(doc) + "\n" for doc in documents)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_arith.yaml").write_text(f"""task: tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "arith.jsonl"}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf",
                           "--model_args", f"pretrained={hf},dtype=float32", "--tasks", "tiny_arith",
                           "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8",
                           "--output_path", str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results_file = next(os.path.join(d, f) for d, _, files in os.walk(tmp_path / "results") for f in files
                        if f.startswith("results") and f.endswith(".json"))
    scores = json.load(open(results_file))["results"]["tiny_arith"]
    assert 0.0 <= scores["acc,none"] <= 1.0
    model, tokenizer = hf_model(hf), __import__("transformers").AutoTokenizer.from_pretrained(hf)
    log_likelihoods = []
    with torch.no_grad():
        for doc in documents:
            context = tokenizer(doc["context"])["input_ids"]
            target = tokenizer(doc["context"] + doc["target"])["input_ids"][len(context):]
            ids = torch.tensor([context + target])
            log_probs = torch.log_softmax(model(ids).logits[0, len(context) - 1:-1].double(), dim=-1)
            log_likelihoods.append(log_probs[torch.arange(len(target)), torch.tensor(target)].sum().item())
    assert scores["perplexity,none"] == pytest.approx(math.exp(-np.mean(log_likelihoods)), rel=1e-4)


def test_launcher_exports_the_recovered_model(corpus, tokenizer_json, tmp_path):
    """The two-phase launcher with --export-hf: after recovery the final model is a HF folder whose
    next-token loss on the validation samples is the one recovery logged; a superposition
    checkpoint is refused by to-hf."""
    from megatron_tst import launch

    save, exported = str(tmp_path / "run"), str(tmp_path / "hf")
    argv = train_argv(corpus, tokenizer_json, save, "dense-untied-pp2", iters=4)
    argv = argv[argv.index("--tokenizer-type"):]  # one process: no parallel layout flags
    argv = ["--model-preset", "tiny", "--untie-embeddings-and-output-weights", *argv,
            "--tst-bag-size", "2", "--tst-ratio", "0.5"]
    assert launch.main(["--export-hf", exported, *argv]) == 0
    recovery = os.path.join(save, "recovery")
    samples = megatron_reference(recovery, corpus, torch.ones(1, 2, dtype=torch.long), new_tokens=0)["valid"]
    assert hf_loss(hf_model(exported), samples) == pytest.approx(logged_validation_loss(recovery), rel=1e-5, abs=1e-5)
    code, error = convert("to-hf", "--input", os.path.join(save, "superposition"), "--output", str(tmp_path / "p1"))
    assert code == 1 and "not a next-token model yet" in error and "--allow-superposition" in error
    assert convert("to-hf", "--input", os.path.join(save, "superposition"), "--output", str(tmp_path / "p1"),
                   "--allow-superposition")[0] == 0
