"""Hugging Face export and import: torch_dist checkpoints <-> ``save_pretrained`` folders.

``to_hf``: a checkpoint saved at any TP/PP/EP layout (distributed optimizer or not) -> a Llama,
Qwen3 or Qwen3-MoE folder (config.json, generation_config.json, safetensors with an index when
sharded, tokenizer files). megatron-core's torch_dist format stores every parameter as its global,
unsharded tensor (layers stacked on a leading axis, experts on the next, TP shards at their global
offsets), so one process reads the model weights with torch.distributed.checkpoint, one parameter at
a time, and never the optimizer state. Layouts (facts of megatron-core's GPT model):

- ``linear_qkv``: per query group g, [the group's q heads, k_g, v_g], each head ``head_dim`` rows;
- ``linear_fc1`` (SwiGLU): [gate; up] on the output axis; experts likewise, per global expert id;
- norms: ``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``
  (the names torch_dist uses for the local spec's ``input_layernorm`` / ``pre_mlp_layernorm`` too);
- the embedding and output head are padded to a multiple of --make-vocab-size-divisible-by (128) x TP
  rows: trimmed to the vocabulary.

transformers 5 keeps Qwen3-MoE experts as fused 3-D tensors in memory but its ``save_pretrained``
writes (and every release loads) per-expert ``mlp.experts.N.{gate,up,down}_proj`` modules: that is
what is written.

``from_hf``: the reverse. It builds the model once at TP=PP=EP=1 in this process, fills it and saves
it with megatron-core's dist_checkpointing: a torch_dist checkpoint holds global tensors, so it is
the same checkpoint that N ranks at the target layout would write, except the vocabulary padding,
which depends on TP and is made for the requested ``--tensor-model-parallel-size``. The checkpoint
is weights-only (``run_config.json`` says so): ``megatron_tst.pretrain --load`` takes its weights and
starts a fresh run at iteration 0 (fresh optimizer, schedule and data position, as Megatron-LM's
``--finetune``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from megatron_tst import checkpointing

MODEL_TYPES = ("llama", "qwen3", "qwen3_moe")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_DIR = "tokenizer"  # from-hf keeps the model's tokenizer here, beside the iteration folders

# torch_dist key (layer-stacked) and the alternative names other specs or versions give it
_KEYS = {
    "embedding": ["embedding.word_embeddings.weight"],
    "output": ["output_layer.weight"],
    "final_norm": ["decoder.final_layernorm.weight"],
    "input_norm": ["decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.input_layernorm.weight"],
    "qkv": ["decoder.layers.self_attention.linear_qkv.weight"],
    "q_norm": ["decoder.layers.self_attention.q_layernorm.weight"],
    "k_norm": ["decoder.layers.self_attention.k_layernorm.weight"],
    "proj": ["decoder.layers.self_attention.linear_proj.weight"],
    "mlp_norm": ["decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight"],
    "fc1": ["decoder.layers.mlp.linear_fc1.weight"],
    "fc2": ["decoder.layers.mlp.linear_fc2.weight"],
    "router": ["decoder.layers.mlp.router.weight"],
    "expert_fc1": ["decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.experts.linear_fc1.weight",
                   "decoder.layers.mlp.experts.local_experts.linear_fc1.weight"],
    "expert_fc2": ["decoder.layers.mlp.experts.experts.linear_fc2.weight", "decoder.layers.mlp.experts.linear_fc2.weight",
                   "decoder.layers.mlp.experts.local_experts.linear_fc2.weight"],
}


class ConversionError(ValueError):
    """Input or options that cannot be converted; the message says what to do."""


# ----------------------------------------------------------------------------------------- reading

def resolve_checkpoint(path: str) -> str:
    """The iteration folder for ``path`` (a --save directory: its newest checkpoint; or an iter_* folder)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path} is not a directory; give a --save directory or one of its iter_* folders")
    if os.path.isfile(os.path.join(path, checkpointing.TRACKER)):
        try:
            iteration = checkpointing.latest_iteration(path)
        except checkpointing.CheckpointError as error:
            raise ConversionError(str(error)) from None
        path = checkpointing.checkpoint_dir(path, iteration)
    if not (os.path.isfile(os.path.join(path, ".metadata"))
            and os.path.isfile(os.path.join(path, checkpointing.RUN_CONFIG))):
        raise ConversionError(f"{path} is not a megatron_tst torch_dist checkpoint (no .metadata and run_config.json); "
                              "give a --save directory or one of its iter_* folders")
    return path


class CheckpointReader:
    """Global tensors of a torch_dist checkpoint, one at a time, in a single process."""

    def __init__(self, directory: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = directory
        self._reader = FileSystemReader(directory)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as error:
            raise ConversionError(f"cannot read {directory}/.metadata ({type(error).__name__}); "
                                  "the checkpoint is damaged: use another iteration") from None
        self.tensors = {key: value for key, value in self.metadata.state_dict_metadata.items()
                        if hasattr(value, "size") and "optimizer" not in key}
        self._check_files()

    def _check_files(self):
        """Every shard file the model's tensors live in exists and is long enough (truncation)."""
        needed: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            if index.fqn in self.tensors:
                end = info.offset + info.length
                needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in needed.items():
            path = os.path.join(self.directory, name)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size is None or size < end:
                state = "missing" if size is None else f"truncated ({size:,} of at least {end:,} bytes)"
                raise ConversionError(f"shard {path} is {state}; the checkpoint is incomplete: "
                                      "copy it again or use another iteration")

    def find(self, name: str) -> str | None:
        return next((key for key in _KEYS[name] if key in self.tensors), None)

    def load(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint import load

        meta = self.tensors[key]
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
        try:
            load(state, storage_reader=self._reader, no_dist=True)
        except Exception as error:  # a damaged shard whose size is right
            raise ConversionError(f"cannot read {key} from {self.directory} ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:200]}); the checkpoint is damaged: "
                                  "use another iteration") from None
        return state[key]

    def get(self, name: str, required: bool = True) -> torch.Tensor | None:
        key = self.find(name)
        if key is None:
            if required:
                raise ConversionError(f"{self.directory} has no {' / '.join(_KEYS[name])}; "
                                      "is it a checkpoint of a GPT model?")
            return None
        return self.load(key)


# --------------------------------------------------------------------------------------- the shape

def _arch_fields(model: dict) -> dict:
    head_dim = model.get("kv_channels") or model["hidden_size"] // model["num_attention_heads"]
    return dict(model, head_dim=head_dim)


# What Llama, Qwen3 and Qwen3-MoE all are (run_configs written before these fields existed hold this)
HF_FAMILY = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                 apply_layernorm_1p=False, rotary_percent=1.0)


def pick_model_type(model: dict, requested: str = "auto") -> str:
    """auto: qwen3_moe with experts, qwen3 with QK-norm, llama otherwise; refuse what cannot be expressed."""
    if requested not in ("auto",) + MODEL_TYPES:
        raise ConversionError(f"unknown --model-type {requested!r}; choose auto, {', '.join(MODEL_TYPES)}")
    for key, value in HF_FAMILY.items():
        if model.get(key, value) != value:
            raise ConversionError(
                f"{key}: the checkpoint has {key}={model[key]!r}, which {', '.join(MODEL_TYPES)} cannot express "
                f"(they have {value!r}); only a model trained with RMSNorm, --swiglu, rope positions, "
                "--disable-bias-linear and without --apply-layernorm-1p or --rotary-percent exports")
    moe, qk_norm = bool(model.get("num_experts")), bool(model.get("qk_layernorm"))
    if requested == "auto":
        requested = "qwen3_moe" if moe else "qwen3" if qk_norm else "llama"
    if requested == "llama" and qk_norm:
        raise ConversionError("qk_layernorm: the checkpoint has QK-norm, which Llama has not; use --model-type qwen3")
    if requested in ("llama", "qwen3") and moe:
        raise ConversionError(f"num_experts: the checkpoint is a MoE model ({model['num_experts']} experts); "
                              f"{requested} is dense: use --model-type qwen3_moe")
    if requested == "qwen3" and not qk_norm:
        raise ConversionError("qk_layernorm: Qwen3 always has QK-norm and this checkpoint has none; use --model-type llama")
    if requested == "qwen3_moe":
        if not moe:
            raise ConversionError("num_experts: the checkpoint is dense; use --model-type qwen3 or llama")
        if not qk_norm:
            raise ConversionError("qk_layernorm: Qwen3-MoE always has QK-norm and this checkpoint has none")
    if model["num_attention_heads"] % model["num_query_groups"]:
        raise ConversionError("num_query_groups: must divide num_attention_heads")
    return requested


def hf_config(model: dict, model_type: str, dtype: torch.dtype, token_ids: dict):
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    shape = _arch_fields(model)
    common = dict(
        vocab_size=model["vocab_size"], hidden_size=model["hidden_size"], intermediate_size=model["ffn_hidden_size"],
        num_hidden_layers=model["num_layers"], num_attention_heads=model["num_attention_heads"],
        num_key_value_heads=model["num_query_groups"], head_dim=shape["head_dim"],
        max_position_embeddings=model["max_position_embeddings"], rms_norm_eps=model["norm_epsilon"],
        rope_theta=model["rotary_base"], tie_word_embeddings=not model["untie_embeddings_and_output_weights"],
        initializer_range=model["init_method_std"], hidden_act="silu", attention_bias=False,
        bos_token_id=token_ids.get("bos_token_id"), eos_token_id=token_ids.get("eos_token_id"),
        architectures=[{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                        "qwen3_moe": "Qwen3MoeForCausalLM"}[model_type]],
    )
    if model_type == "llama":
        config = LlamaConfig(mlp_bias=False, **common)
    elif model_type == "qwen3":
        config = Qwen3Config(use_sliding_window=False, **common)
    else:
        config = Qwen3MoeConfig(
            use_sliding_window=False, num_experts=model["num_experts"], num_experts_per_tok=model["moe_router_topk"],
            moe_intermediate_size=model["moe_ffn_hidden_size"], norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], router_aux_loss_coef=model["moe_aux_loss_coeff"], **common)
    config.dtype = dtype
    return config


# ------------------------------------------------------------------------------------------ writing

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class ShardedSafetensorsWriter:
    """Streams tensors into safetensors files as they come: each tensor's bytes go straight to a data
    file and only its name, shape and offsets are kept, so the writer holds no weights (the export's
    memory is the one checkpoint parameter being converted). A shard is closed, header first, when
    the next tensor would take it past ``max_bytes``; more than one shard gets an index file."""

    def __init__(self, directory: str, max_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory, self.max_bytes = directory, max_bytes
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self._data = None

    def _open_shard(self):
        self._data_path = os.path.join(self.directory, f"part-{len(self.files):05d}.data")
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self._data is not None and self._entries and self._offset + size > self.max_bytes:
            self._close_shard()
        if self._data is None:
            self._open_shard()
        tensor = tensor.detach().contiguous()
        self._data.write(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))
        self._entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self.total_bytes += size

    def _close_shard(self):
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        name = f"part-{len(self.files):05d}.safetensors"
        with open(os.path.join(self.directory, name), "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 64 * 1024 * 1024)
        os.remove(self._data_path)
        self.files.append((name, list(self._entries)))
        self._data = None

    def close(self):
        if self._data is None and not self.files:
            self._open_shard()
        if self._data is not None:
            self._close_shard()
        if len(self.files) == 1:
            os.replace(os.path.join(self.directory, self.files[0][0]), os.path.join(self.directory, WEIGHTS_NAME))
            return
        count = len(self.files)
        weight_map = {}
        for number, (name, keys) in enumerate(self.files, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, name), os.path.join(self.directory, final))
            weight_map.update({key: final for key in keys})
        with open(os.path.join(self.directory, INDEX_NAME), "w") as handle:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                      handle, indent=2)


class _AtomicFolder:
    """Write into ``<output>.tmp-<pid>`` and rename over ``output`` only when complete."""

    def __init__(self, output: str, overwrite: bool):
        self.output = os.path.abspath(output.rstrip("/"))
        if os.path.exists(self.output) and not overwrite:
            raise ConversionError(f"{output} already exists; remove it or pass --overwrite")
        self.partial = f"{self.output}.tmp-{os.getpid()}"

    def __enter__(self) -> str:
        if os.path.exists(self.partial):
            shutil.rmtree(self.partial)
        os.makedirs(self.partial)
        return self.partial

    def __exit__(self, kind, error, trace):
        if kind is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            return False
        if os.path.exists(self.output):
            old = f"{self.output}.old-{os.getpid()}"
            os.replace(self.output, old)
            os.replace(self.partial, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.output)
        return False


# ------------------------------------------------------------------------------------------- to-hf

def superposition_reason(run_config: dict) -> str | None:
    """Why this checkpoint is not a next-token model yet, or None."""
    iteration = run_config.get("iteration", 0)
    plan = run_config.get("tst") or run_config.get("converted_from_tst")
    if plan and iteration <= plan["switch_iter"]:
        return (f"the checkpoint is at iteration {iteration}, in TST phase 1 (superposition, up to iteration "
                f"{plan['switch_iter']}): the model is not a next-token model yet; export a checkpoint after "
                "recovery, or pass --allow-superposition")
    return None


def tokenizer_of(run_config: dict, tokenizer_type: str | None, tokenizer_model: str | None,
                 vocab_file: str | None = None, merge_file: str | None = None) -> dict:
    """The tokenizer to export: given explicitly, else the one the run recorded (type, model, and for
    GPT2BPETokenizer its vocab.json and merges.txt)."""
    recorded = run_config.get("tokenizer") or {}
    if not (tokenizer_model or vocab_file or merge_file):  # explicit files replace what the run recorded
        tokenizer_type, tokenizer_model = tokenizer_type or recorded.get("type"), recorded.get("model")
        vocab_file, merge_file = recorded.get("vocab_file"), recorded.get("merge_file")
    if (vocab_file or merge_file) and not tokenizer_type:
        tokenizer_type = "GPT2BPETokenizer"
    if tokenizer_model and not tokenizer_type:
        tokenizer_type = ("SentencePieceTokenizer" if str(tokenizer_model).endswith(".model")
                          else "HuggingFaceTokenizer")
    if tokenizer_type == "TikTokenizer":
        raise ConversionError("a TikTokenizer run: no Hugging Face tokenizer is written from a tiktoken vocabulary; "
                              "pass --tokenizer-model of a HuggingFace tokenizer with the same ids")
    files = {"--vocab-file": vocab_file, "--merge-file": merge_file} if tokenizer_type == "GPT2BPETokenizer" \
        else {"--tokenizer-model": tokenizer_model}
    if tokenizer_type in (None, "NullTokenizer") or not all(files.values()):
        raise ConversionError("no tokenizer: the run did not record one (NullTokenizer or an older run); "
                              "pass --tokenizer-model (and --tokenizer-type), or --vocab-file and --merge-file, of "
                              "the tokenizer the data was made with")
    for flag, path in files.items():
        if not os.path.exists(path):
            raise ConversionError(f"tokenizer {path} not found; pass {flag} with its current path")
    return dict(type=tokenizer_type, model=tokenizer_model, vocab_file=vocab_file, merge_file=merge_file)


def _hf_layer_tensors(reader: CheckpointReader, model: dict, model_type: str, dtype: torch.dtype):
    """(hf name, tensor) pairs, one checkpoint parameter (all layers) at a time."""
    layers = model["num_layers"]
    heads, groups = model["num_attention_heads"], model["num_query_groups"]
    head_dim = _arch_fields(model)["head_dim"]
    per_group = heads // groups

    def named(name):
        return lambda i: f"model.layers.{i}.{name}"

    def per_layer(stacked, name, expected):
        if stacked.shape[0] != layers or tuple(stacked.shape[1:]) != expected:
            raise ConversionError(f"{name}: checkpoint tensor has shape {tuple(stacked.shape)}, run_config.json "
                                  f"says ({layers}, {', '.join(map(str, expected))}); the two do not belong together")
        return stacked

    hidden = model["hidden_size"]
    stacked = per_layer(reader.get("input_norm"), "input_layernorm", (hidden,))
    for i in range(layers):
        yield named("input_layernorm.weight")(i), stacked[i].to(dtype)
    qkv = per_layer(reader.get("qkv"), "linear_qkv", ((heads + 2 * groups) * head_dim, hidden))
    qkv = qkv.view(layers, groups, per_group + 2, head_dim, hidden)
    for i in range(layers):
        yield named("self_attn.q_proj.weight")(i), qkv[i, :, :per_group].reshape(heads * head_dim, hidden).to(dtype)
        yield named("self_attn.k_proj.weight")(i), qkv[i, :, per_group].reshape(groups * head_dim, hidden).to(dtype)
        yield named("self_attn.v_proj.weight")(i), qkv[i, :, per_group + 1].reshape(groups * head_dim, hidden).to(dtype)
    del qkv
    if model_type != "llama":
        for part, hf_name in (("q_norm", "self_attn.q_norm.weight"), ("k_norm", "self_attn.k_norm.weight")):
            stacked = per_layer(reader.get(part), part, (head_dim,))
            for i in range(layers):
                yield named(hf_name)(i), stacked[i].to(dtype)
    stacked = per_layer(reader.get("proj"), "linear_proj", (hidden, heads * head_dim))
    for i in range(layers):
        yield named("self_attn.o_proj.weight")(i), stacked[i].to(dtype)
    stacked = per_layer(reader.get("mlp_norm"), "pre_mlp_layernorm", (hidden,))
    for i in range(layers):
        yield named("post_attention_layernorm.weight")(i), stacked[i].to(dtype)
    del stacked
    if model_type == "qwen3_moe":
        experts, ffn = model["num_experts"], model["moe_ffn_hidden_size"]
        router = per_layer(reader.get("router"), "router", (experts, hidden))
        for i in range(layers):
            yield named("mlp.gate.weight")(i), router[i].to(dtype)
        fc1 = per_layer(reader.get("expert_fc1"), "experts.linear_fc1", (experts, 2 * ffn, hidden))
        for i in range(layers):
            for e in range(experts):
                yield named(f"mlp.experts.{e}.gate_proj.weight")(i), fc1[i, e, :ffn].to(dtype)
                yield named(f"mlp.experts.{e}.up_proj.weight")(i), fc1[i, e, ffn:].to(dtype)
        del fc1
        fc2 = per_layer(reader.get("expert_fc2"), "experts.linear_fc2", (experts, hidden, ffn))
        for i in range(layers):
            for e in range(experts):
                yield named(f"mlp.experts.{e}.down_proj.weight")(i), fc2[i, e].to(dtype)
        del fc2
    else:
        ffn = model["ffn_hidden_size"]
        fc1 = per_layer(reader.get("fc1"), "linear_fc1", (2 * ffn, hidden))
        for i in range(layers):
            yield named("mlp.gate_proj.weight")(i), fc1[i, :ffn].to(dtype)
            yield named("mlp.up_proj.weight")(i), fc1[i, ffn:].to(dtype)
        del fc1
        fc2 = per_layer(reader.get("fc2"), "linear_fc2", (hidden, ffn))
        for i in range(layers):
            yield named("mlp.down_proj.weight")(i), fc2[i].to(dtype)


def to_hf(checkpoint: str, output: str, model_type: str = "auto", dtype: str | None = None,
          overwrite: bool = False, allow_superposition: bool = False, tokenizer_type: str | None = None,
          tokenizer_model: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          vocab_file: str | None = None, merge_file: str | None = None) -> str:
    """Export the checkpoint at ``checkpoint`` (a --save directory or an iter_* folder) to ``output``."""
    directory = resolve_checkpoint(checkpoint)
    with open(os.path.join(directory, checkpointing.RUN_CONFIG)) as handle:
        run_config = json.load(handle)
    model = run_config.get("model")
    if not model:
        raise ConversionError(f"{directory}/run_config.json has no model shape; it was not written by megatron_tst")
    reason = superposition_reason(run_config)
    if reason and not allow_superposition:
        raise ConversionError(reason)
    model_type = pick_model_type(model, model_type)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)}")
    tokenizer = tokenizer_of(run_config, tokenizer_type, tokenizer_model, vocab_file, merge_file)
    reader = CheckpointReader(directory)
    embedding_key = reader.find("embedding")
    if embedding_key is None:
        raise ConversionError(f"{directory} has no embedding.word_embeddings.weight; is it a GPT checkpoint?")
    target_dtype = DTYPES[dtype] if dtype else reader.tensors[embedding_key].properties.dtype
    vocab, tied = model["vocab_size"], not model["untie_embeddings_and_output_weights"]
    padded = reader.tensors[embedding_key].size[0]
    if padded < vocab:
        raise ConversionError(f"vocab_size: run_config.json says {vocab} but the embedding has {padded} rows")

    from transformers import GenerationConfig

    with _AtomicFolder(output, overwrite) as partial:
        try:
            token_ids = _save_tokenizer(tokenizer, partial, vocab)
        except (ValueError, OSError) as error:
            raise ConversionError(f"tokenizer {tokenizer['model'] or tokenizer['vocab_file']}: "
                                  f"{' '.join(str(error).split())}") from None
        config = hf_config(model, model_type, target_dtype, token_ids)
        writer = ShardedSafetensorsWriter(partial, max_shard_bytes)
        writer.add("model.embed_tokens.weight", reader.load(embedding_key)[:vocab].to(target_dtype))
        for name, tensor in _hf_layer_tensors(reader, model, model_type, target_dtype):
            writer.add(name, tensor)
        writer.add("model.norm.weight", reader.get("final_norm").to(target_dtype))
        if not tied:
            writer.add("lm_head.weight", reader.get("output")[:vocab].to(target_dtype))
        writer.close()
        config.save_pretrained(partial)
        GenerationConfig(bos_token_id=token_ids.get("bos_token_id"), eos_token_id=token_ids.get("eos_token_id"),
                         ).save_pretrained(partial)
    return os.path.abspath(output)


def _save_tokenizer(tokenizer: dict, directory: str, vocab_size: int) -> dict:
    from megatron_tst.hf_tokenizer import save_tokenizer

    return save_tokenizer(tokenizer["type"], tokenizer["model"], directory, vocab_size,
                          vocab_file=tokenizer["vocab_file"], merge_file=tokenizer["merge_file"])


# ----------------------------------------------------------------------------------------- from-hf

class HFReader:
    """Tensors of a save_pretrained folder, one at a time (safetensors, sharded or not)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = os.path.join(directory, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            files = [WEIGHTS_NAME]
        else:
            raise ConversionError(f"{directory} has no {WEIGHTS_NAME} or {INDEX_NAME}; "
                                  "give a save_pretrained folder with safetensors weights")
        self.location = {}
        self._handles = {}
        for name in files:
            path = os.path.join(directory, name)
            try:
                handle = safe_open(path, "pt")
            except Exception as error:
                raise ConversionError(f"cannot read {path} ({' '.join(str(error).split())[:200]}); "
                                      "the file is damaged or truncated: download it again") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.location[key] = name

    def __contains__(self, name):
        return name in self.location

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise ConversionError(f"the Hugging Face weights have no {name}")
        return self._handles[self.location[name]].get_tensor(name)


def arch_from_hf(config: dict) -> dict:
    """The GPTArchitecture fields of a Llama / Qwen3 / Qwen3-MoE config.json; refuse the rest naming the field."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} is not supported; from-hf takes {', '.join(MODEL_TYPES)}")
    for field, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None)),
                           ("use_sliding_window", (False, None))):
        if config.get(field) not in allowed:
            raise ConversionError(f"{field}: {config.get(field)!r} is not supported (megatron_tst models use "
                                  f"{allowed[0]!r})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConversionError(f"rope_parameters: rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"rope_theta: {theta} is not an integer (megatron_tst stores RoPE bases as integers)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    moe = model_type == "qwen3_moe"
    if moe and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        raise ConversionError("mlp_only_layers/decoder_sparse_step: dense layers inside a MoE model are not supported")
    if moe and not config.get("norm_topk_prob", False):
        raise ConversionError("norm_topk_prob: false is not supported (megatron_tst routes with normalised top-k)")
    from megatron_tst.models.gpt import GPTArchitecture

    defaults = GPTArchitecture(1, 1, 1, 1, 1, 1)
    return dict(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
        kv_channels=None if head_dim == hidden // heads else head_dim, rotary_base=int(theta),
        norm_epsilon=config["rms_norm_eps"], untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        qk_layernorm=model_type != "llama", init_method_std=config.get("initializer_range", defaults.init_method_std),
        num_experts=config.get("num_experts", config.get("num_local_experts")) if moe else None,
        moe_router_topk=config["num_experts_per_tok"] if moe else defaults.moe_router_topk,
        moe_ffn_hidden_size=config["moe_intermediate_size"] if moe else None,
        moe_aux_loss_coeff=config.get("router_aux_loss_coef", defaults.moe_aux_loss_coeff) if moe
        else defaults.moe_aux_loss_coeff,
    )


def _megatron_state(hf: HFReader, model: dict, padded_vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Yield (megatron local-spec state-dict name, tensor) for every parameter."""
    layers, hidden = model["num_layers"], model["hidden_size"]
    heads, groups = model["num_attention_heads"], model["num_query_groups"]
    head_dim = _arch_fields(model)["head_dim"]
    vocab = model["vocab_size"]

    def padded_table(tensor):
        table = torch.zeros(padded_vocab, hidden, dtype=dtype)
        table[:vocab] = tensor
        return table

    yield "embedding.word_embeddings.weight", padded_table(hf.get("model.embed_tokens.weight"))
    for i in range(layers):
        hf_layer, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mg + "input_layernorm.weight", hf.get(hf_layer + "input_layernorm.weight")
        q = hf.get(hf_layer + "self_attn.q_proj.weight").view(groups, heads // groups, head_dim, hidden)
        k = hf.get(hf_layer + "self_attn.k_proj.weight").view(groups, 1, head_dim, hidden)
        v = hf.get(hf_layer + "self_attn.v_proj.weight").view(groups, 1, head_dim, hidden)
        yield mg + "self_attention.linear_qkv.weight", torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        if model["qk_layernorm"]:
            yield mg + "self_attention.q_layernorm.weight", hf.get(hf_layer + "self_attn.q_norm.weight")
            yield mg + "self_attention.k_layernorm.weight", hf.get(hf_layer + "self_attn.k_norm.weight")
        yield mg + "self_attention.linear_proj.weight", hf.get(hf_layer + "self_attn.o_proj.weight")
        yield mg + "pre_mlp_layernorm.weight", hf.get(hf_layer + "post_attention_layernorm.weight")
        if model.get("num_experts"):
            yield mg + "mlp.router.weight", hf.get(hf_layer + "mlp.gate.weight")
            fused = hf_layer + "mlp.experts.gate_up_proj"
            for e in range(model["num_experts"]):
                expert = f"{mg}mlp.experts.local_experts.{e}."
                if fused in hf:  # fused 3-D layout (transformers' in-memory form), if someone saved it so
                    yield expert + "linear_fc1.weight", hf.get(fused)[e]
                    yield expert + "linear_fc2.weight", hf.get(hf_layer + "mlp.experts.down_proj")[e]
                else:
                    hf_expert = f"{hf_layer}mlp.experts.{e}."
                    yield expert + "linear_fc1.weight", torch.cat([hf.get(hf_expert + "gate_proj.weight"),
                                                                    hf.get(hf_expert + "up_proj.weight")])
                    yield expert + "linear_fc2.weight", hf.get(hf_expert + "down_proj.weight")
        else:
            yield mg + "mlp.linear_fc1.weight", torch.cat([hf.get(hf_layer + "mlp.gate_proj.weight"),
                                                          hf.get(hf_layer + "mlp.up_proj.weight")])
            yield mg + "mlp.linear_fc2.weight", hf.get(hf_layer + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", hf.get("model.norm.weight")
    if model["untie_embeddings_and_output_weights"]:
        yield "output_layer.weight", padded_table(hf.get("lm_head.weight"))


def from_hf(source: str, output: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
            expert_model_parallel_size: int = 1, overwrite: bool = False) -> str:
    """Import a save_pretrained folder as a weights-only torch_dist checkpoint under ``output``
    (iteration 0), loadable at the given layout. Runs in this process (it joins a one-process group)."""
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{source} has no config.json; give a Hugging Face save_pretrained folder")
    with open(config_path) as handle:
        config = json.load(handle)
    try:
        model = arch_from_hf(config)
    except KeyError as missing:
        raise ConversionError(f"{config_path} has no {missing.args[0]}; is it a {' / '.join(MODEL_TYPES)} config?") from None
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    for value, what, divides in ((model["num_attention_heads"], "num_attention_heads", tp),
                                 (model["num_query_groups"], "num_key_value_heads", tp),
                                 (model["num_layers"], "num_hidden_layers", pp),
                                 (model.get("num_experts") or ep, "num_experts", ep)):
        if value % divides:
            raise ConversionError(f"{what} {value} does not divide over {divides} ranks; pick another layout")
    hf = HFReader(source)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        config.get("dtype") or config.get("torch_dtype"), torch.float32)

    import megatron_tst  # noqa: F401  (CPU platform layer before megatron-core)
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel

    from megatron_tst import parallel
    from megatron_tst.models.gpt import GPTArchitecture, layer_spec, padded_vocab_size, transformer_config

    arch = GPTArchitecture(**model)
    padded = padded_vocab_size(arch.vocab_size, tp, arch.make_vocab_size_divisible_by)
    parallel.initialize()
    try:
        megatron_config = transformer_config(arch, transformer_impl="local", bf16=dtype == torch.bfloat16,
                                             params_dtype=dtype)
        gpt = GPTModel(config=megatron_config, transformer_layer_spec=layer_spec(arch, megatron_config),
                       vocab_size=padded, max_sequence_length=arch.max_position_embeddings,
                       share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
                       position_embedding_type="rope", rotary_base=arch.rotary_base)
        params = gpt.state_dict()
        filled = set()
        with torch.no_grad():
            for name, tensor in _megatron_state(hf, model, padded, dtype):
                target = params.get(name)
                if target is None or tuple(target.shape) != tuple(tensor.shape):
                    raise ConversionError(f"{name}: the Hugging Face weights give shape {tuple(tensor.shape)}, "
                                          f"config.json says {None if target is None else tuple(target.shape)}")
                target.copy_(tensor)
                filled.add(name)
        missing = [n for n, t in params.items() if isinstance(t, torch.Tensor) and n not in filled
                   and not n.endswith("_extra_state")]
        if missing:
            raise ConversionError(f"no Hugging Face weight for {missing[0]} (and {len(missing) - 1} more)")
        run_config = dict(
            model=dataclasses.asdict(arch), tst=None, weights_only=True, imported_from=os.path.abspath(source),
            parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                      "expert_model_parallel_size": ep},
            padded_vocab_size=padded, iteration=0, world_size=None,
            framework_version=megatron_tst.__version__, hf_model_type=config["model_type"],
        )
        with _AtomicFolder(output, overwrite) as partial:
            tokenizer_files = [name for name in os.listdir(source) if name.startswith("tokenizer")
                               or name in ("special_tokens_map.json", "vocab.json", "merges.txt")]
            if tokenizer_files:  # kept with the checkpoint so that to-hf finds it again
                os.makedirs(os.path.join(partial, TOKENIZER_DIR))
                for name in tokenizer_files:
                    shutil.copy2(os.path.join(source, name), os.path.join(partial, TOKENIZER_DIR, name))
                run_config["tokenizer"] = {"type": "HuggingFaceTokenizer",
                                           "model": os.path.join(os.path.abspath(output), TOKENIZER_DIR)}
            iteration_dir = checkpointing.checkpoint_dir(partial, 0)
            os.makedirs(iteration_dir)
            state = {"model": gpt.sharded_state_dict(), "iteration": 0, "scheduler": None,
                     "common": {"weights_only": True}}
            dist_checkpointing.save(state, iteration_dir)
            with open(os.path.join(iteration_dir, checkpointing.RUN_CONFIG), "w") as handle:
                json.dump(run_config, handle, indent=2, sort_keys=True)
            with open(os.path.join(partial, checkpointing.TRACKER), "w") as handle:
                handle.write("0")
    finally:
        parallel.shutdown()
    return os.path.abspath(output)
