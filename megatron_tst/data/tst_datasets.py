"""TST training data: phase-1 samples of s*L+1 tokens, phase-2 samples of L+1, disjoint phases.

Built on megatron-core's dataset machinery: ``IndexedDataset`` (.bin/.idx), ``GPTDataset`` (its
compiled helpers build and cache the sample and shuffle indices) and ``BlendedDataset``.

- ``--data-path`` (``prefix`` or ``w1 prefix1 w2 prefix2 ...``) and ``--split`` (``969,30,1``) have
  Megatron's meaning: each dataset's documents are split into contiguous train/valid/test ranges.
- Each dataset's training documents are permuted with the seed and cut in two at the point that
  gives each phase the same share of headroom over what it will read; phase 1 only ever reads the
  first part and phase 2 the second, so no raw token is read in both phases. Within a phase,
  GPTDataset shuffles the documents and then the samples.
- Phase 1 samples are folded into bags (``tst.fold.split_sample``) here, before any tensor-parallel
  broadcast or context-parallel split, so every rank sees (L, s) tokens and labels.
- Validation samples are next-token samples of L+1 tokens from the valid split in both phases.
- Position in the data is ``(phase, samples consumed in that phase)``: a checkpoint stores that
  and resuming continues with exactly the batches an uninterrupted run would have read.
- If a phase's documents hold fewer tokens than the plan reads, construction fails with the numbers,
  unless repetition is allowed (then GPTDataset runs several epochs over them, and ``report`` says how
  many).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from megatron_tst.data import mock
from megatron_tst.tst.fold import IGNORE_INDEX, fold_sample
from megatron_tst.tst.plan import RECOVERY, SUPERPOSITION, TSTPlan

NEXT_TOKEN = "next-token"  # the single phase of a baseline run
_BLEND_SURPLUS = 0.005  # as megatron-core's builder: per-dataset sample margin so blends never run dry


class DataTooSmallError(ValueError):
    """The corpus holds fewer tokens than the planned run would read."""


@dataclass
class DataConfig:
    data_path: Sequence[str]
    seq_length: int
    global_batch_size: int
    vocab_size: int
    eod: int
    split: str = "969,30,1"
    seed: int = 1234
    eod_mask_loss: bool = False
    allow_repetition: bool = False
    cache_dir: str | None = None  # None: Megatron's default, a cache/ folder beside each dataset
    batch_sizes: Sequence[int] | None = None  # per step, with --rampup-batch-size (else global_batch_size each)
    mock: bool = False  # --mock-data: megatron-core's synthetic documents instead of data_path (data/mock.py)


class _TokenizerInfo:
    """What GPTDatasetConfig needs of a tokenizer (vocabulary size, EOD, a cache identity)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        self.unique_identifiers = OrderedDict(vocab_size=self.vocab_size, eod=self.eod)


class _SelfRepairingGPTDataset(GPTDataset):
    """megatron-core writes its cached index files in place, the description first: a job killed
    while writing one leaves a truncated .npy that every later run would load and crash on. The
    building rank drops this dataset's cache files when one of them does not load, so megatron-core
    sees a cache miss and builds them again."""

    _INDEX_FILES = ("document_index", "sample_index", "shuffle_index")

    def _build_document_sample_shuffle_indices(self):
        if not self.config.mock and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            self._drop_truncated_cache()
        return super()._build_document_sample_shuffle_indices()

    def _drop_truncated_cache(self):
        folder = self.config.path_to_cache or os.path.join(self.dataset.path_prefix, "cache",
                                                           f"{type(self).__name__}_indices")  # as megatron-core
        base = os.path.join(folder, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        for what in self._INDEX_FILES:
            try:
                if os.path.isfile(f"{base}-{what}.npy"):
                    np.load(f"{base}-{what}.npy", mmap_mode="r", allow_pickle=True)
            except (ValueError, OSError, EOFError):
                for stale in [f"{base}-description.txt"] + [f"{base}-{name}.npy" for name in self._INDEX_FILES]:
                    with contextlib.suppress(OSError):
                        os.remove(stale)
                return


class PhaseDocumentsDataset(_SelfRepairingGPTDataset):
    """GPTDataset over an arbitrary document subset, with that subset in its cache identity
    (megatron-core's cache key names the split, not which documents are in it)."""

    def _build_document_sample_shuffle_indices(self):
        digest = hashlib.md5(np.ascontiguousarray(self.indices).tobytes(), usedforsecurity=False)
        self.unique_identifiers["documents_md5"] = digest.hexdigest()
        self.unique_description = json.dumps(
            self.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(
            self.unique_description.encode(), usedforsecurity=False
        ).hexdigest()
        return super()._build_document_sample_shuffle_indices()


def _phases(plan: TSTPlan | None, total_iters: int) -> list[tuple[str, int]]:
    """(phase, optimizer steps) for the run."""
    if plan is None:
        return [(NEXT_TOKEN, total_iters)]
    phases = [(SUPERPOSITION, plan.switch_iter)]
    if plan.has_recovery:  # r = 1: superposition only
        phases.append((RECOVERY, plan.total_iters - plan.switch_iter))
    return phases


class TSTData:
    """The datasets of one planned run: a map-style dataset per phase and a validation dataset."""

    def __init__(self, config: DataConfig, plan: TSTPlan | None, total_iters: int | None = None):
        if plan is not None:
            total_iters = plan.total_iters
        if not total_iters or total_iters < 1:
            raise ValueError("give the number of training iterations (or a TSTPlan)")
        self.config, self.plan = config, plan
        self.phase_names = [name for name, _ in _phases(plan, total_iters)]
        self.samples = {}
        self.sample_length = {}
        first = 0
        for name, steps in _phases(plan, total_iters):
            sizes = (config.batch_sizes[first:first + steps] if config.batch_sizes
                     else [config.global_batch_size] * steps)
            self.samples[name], first = sum(sizes), first + steps
            bag = plan.bag_size if (name == SUPERPOSITION and plan.mode != "output-only") else 1
            self.sample_length[name] = bag * config.seq_length + 1
        self.report_rows = []
        self._cache_probes = []
        if torch.distributed.is_initialized() and not config.mock:  # mock data: nothing cached, nothing shared
            self._construct_on_every_rank()
        else:
            self._construct()

    # -- construction -------------------------------------------------------------------------

    def _construct(self):
        prefixes, weights = ([mock.PREFIX], [1.0]) if self.config.mock else self._blend()
        split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.config.split))
        self._blend_spec = None if self.config.mock else (prefixes, weights)  # None: megatron-core's mock config
        self._dataset_config = {
            name: self._gpt_config(self.sample_length[name] - 1) for name in self.phase_names
        }
        self._valid_config = self._gpt_config(self.config.seq_length)
        self._build(prefixes, weights, split_matrix)

    def _construct_on_every_rank(self):
        """Rank 0 builds (and caches) the indices first, the others then load them. Rank 0 tells the
        others whether it succeeded (instead of leaving them in a barrier until the collective
        timeout), then every rank says whether it did, and all raise the same error if any failed.
        Rank 0 also leaves a probe file in each cache folder: a rank that cannot see it is on a node
        where the cache is not the one rank 0 wrote, which megatron-core would only report as a
        missing .npy file."""
        dist = torch.distributed
        rank = dist.get_rank()
        local = _attempt(self._construct) if rank == 0 else None
        shared = [local.shared if local else None, self._cache_probes]
        dist.broadcast_object_list(shared, src=0)
        rank_zero_failure, probes = shared
        if rank_zero_failure is not None:
            if local is not None:
                raise local.error
            _raise(rank_zero_failure, "rank 0")
        if rank != 0:  # the probes by name, in this rank's own view of the cache folders
            expected = [os.path.join(folder, os.path.basename(probe))
                        for folder, probe in zip(self._cache_folders(), probes)]
            local = _attempt(lambda: _check_cache_shared(expected)) or _attempt(self._construct)
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, local.shared if local else None)
        if rank == 0:
            for probe in probes:
                with contextlib.suppress(OSError):
                    os.remove(probe)
        if local is not None:
            raise local.error
        failed = [index for index, failure in enumerate(failures) if failure is not None]
        if failed:
            _raise(failures[failed[0]], f"rank {failed[0]}")

    def _cache_folders(self) -> list[str]:
        """Where megatron-core caches this run's indices (this rank's view of the same paths)."""
        if self.config.cache_dir:
            return [self.config.cache_dir]
        return sorted({os.path.join(prefix, "cache") for prefix in resolve_blend(self.config.data_path)[0]})

    def _before_caching(self, prefixes):
        """Rank 0, just before megatron-core writes its index cache: a probe per cache folder."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return
        for folder in self._cache_folders():
            probe = os.path.join(folder, f".shared-probe-{uuid.uuid4().hex}")
            try:
                os.makedirs(folder, exist_ok=True)
                open(probe, "w").close()
            except OSError as error:
                raise ValueError(f"cannot write the dataset index cache in {folder} ({error.strerror}); give "
                                 "--data-cache-path a writable folder that every node sees") from None
            self._cache_probes.append(probe)

    def _blend(self):
        prefixes, weights = resolve_blend(self.config.data_path)
        for prefix in prefixes:
            check_indexed_files(prefix)
        weights = [1.0] * len(prefixes) if weights is None else weights
        total = sum(weights)
        return prefixes, [w / total for w in weights]

    def _gpt_config(self, sequence_length: int) -> GPTDatasetConfig:
        return GPTDatasetConfig(
            random_seed=self.config.seed,
            sequence_length=sequence_length,
            blend=self._blend_spec,  # also tells megatron-core these are real (cacheable) datasets
            split=self.config.split,
            path_to_cache=None if self.config.mock else self.config.cache_dir,
            tokenizer=_TokenizerInfo(self.config.vocab_size, self.config.eod),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=self.config.eod_mask_loss,
            create_attention_mask=False,
        )

    def _build(self, prefixes, weights, split_matrix):
        per_phase = {name: [] for name in self.phase_names}
        valid = []
        if self.config.mock:
            indexed_datasets = [mock.low_level_dataset(_TokenizerInfo(self.config.vocab_size, self.config.eod))]
        else:
            indexed_datasets = [IndexedDataset(prefix, multimodal=False, mmap=True) for prefix in prefixes]
            for prefix, indexed in zip(prefixes, indexed_datasets):  # all refusals before any cache is written
                self._check_token_ids(prefix, indexed)
            self._before_caching(prefixes)
        for index, (prefix, weight, indexed) in enumerate(zip(prefixes, weights, indexed_datasets)):
            path = None if self.config.mock else prefix
            documents = indexed.sequence_lengths.shape[0]
            train_range, valid_range = split_matrix[0], split_matrix[1]
            train_docs = np.arange(round(train_range[0] * documents), round(train_range[1] * documents),
                                   dtype=np.int32)
            requests = {name: int(math.ceil(math.ceil(self.samples[name] * weight) * (1 + _BLEND_SURPLUS)))
                        for name in self.phase_names}
            for name, docs in self._cut(indexed, train_docs, requests, index).items():
                self._check_size(prefix, name, indexed, docs, requests[name])
                per_phase[name].append(PhaseDocumentsDataset(
                    indexed, path, docs, requests[name], Split.train, self._dataset_config[name]))
            if valid_range is not None:
                valid_docs = np.arange(round(valid_range[0] * documents), round(valid_range[1] * documents),
                                       dtype=np.int32)
                if len(valid_docs):
                    valid.append(_SelfRepairingGPTDataset(indexed, path, valid_docs, None, Split.valid,
                                                          self._valid_config))
        self.train = {name: self._blended(per_phase[name], weights, self.samples[name])
                      for name in self.phase_names}
        # every validation sample once, the datasets interleaved (integer weights = sample counts)
        self.valid = self._blended(valid, [len(d) for d in valid], None) if valid else None

    def _check_token_ids(self, prefix, indexed):
        """Refuse data made with a tokenizer of a larger vocabulary (an out-of-range id would crash the
        embedding lookup mid-run, or read garbage on a GPU)."""
        dtype = indexed.index.dtype
        if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max < self.config.vocab_size:
            return  # the .bin's dtype cannot hold an id outside the vocabulary
        largest, remember = largest_token_id(prefix, dtype, self.config.cache_dir)
        if largest < self.config.vocab_size:
            remember(largest)
        else:
            raise ValueError(
                f"{prefix}.bin holds token id {largest:,} but the tokenizer's vocabulary has only "
                f"{self.config.vocab_size:,} ids: the data was preprocessed with another tokenizer; give "
                "the tokenizer it was made with (--tokenizer-model, or --vocab-size with NullTokenizer) "
                "or preprocess it again with this one")

    def _cut(self, indexed, train_docs, requests, dataset_index) -> dict[str, np.ndarray]:
        """Assign each training document to one phase: a seeded permutation cut where each phase
        gets the same fraction of headroom over the tokens it will read."""
        if len(self.phase_names) == 1:
            return {self.phase_names[0]: train_docs}
        order = np.random.RandomState(self.config.seed + 7919 * (dataset_index + 1)).permutation(train_docs)
        lengths = indexed.sequence_lengths[order].astype(np.int64)
        needs = [requests[name] * (self.sample_length[name] - 1) + 1 for name in self.phase_names]
        share = needs[0] / sum(needs)
        cut = int(np.searchsorted(np.cumsum(lengths), share * lengths.sum())) + 1
        cut = min(max(cut, 1), len(order) - 1) if len(order) > 1 else len(order)
        first, second = np.sort(order[:cut]).astype(np.int32), np.sort(order[cut:]).astype(np.int32)
        return dict(zip(self.phase_names, (first, second)))

    def _check_size(self, prefix, phase, indexed, docs, samples):
        tokens_needed = samples * (self.sample_length[phase] - 1) + 1
        available = int(indexed.sequence_lengths[docs].sum()) if len(docs) else 0
        epochs = math.ceil(tokens_needed / available) if available else math.inf
        self.report_rows.append(dict(dataset=prefix, phase=phase, documents=len(docs),
                                     tokens_available=available, tokens_planned=tokens_needed,
                                     samples=samples, epochs=epochs))
        if epochs > 1 and not (self.config.allow_repetition or self.config.mock) or available == 0:
            raise DataTooSmallError(
                f"corpus too small for the planned run: the {phase} phase reads {tokens_needed:,} tokens "
                f"({samples:,} samples of {self.sample_length[phase]}) from {prefix}, whose share of the "
                f"training split holds {available:,} in {len(docs):,} documents; add data, train fewer "
                "iterations, or allow repetition (--allow-data-repetition)"
            )

    def _blended(self, datasets, weights, size):
        if len(datasets) == 1:
            return datasets[0]
        return BlendedDataset(datasets, weights, size, datasets[0].config)

    # -- use -------------------------------------------------------------------------------------

    def phase_of(self, iteration: int) -> str:
        return self.plan.phase(iteration) if self.plan is not None else NEXT_TOKEN

    def sample(self, phase: str, index: int) -> dict[str, torch.Tensor]:
        """Training sample ``index`` of ``phase``: tokens and labels as the TST model takes them."""
        raw = self.train[phase][index]
        return _model_sample(raw, self.plan if phase == SUPERPOSITION else None)

    def valid_sample(self, index: int) -> dict[str, torch.Tensor]:
        return _model_sample(self.valid[index], None)

    def micro_batches(self, phase: str, consumed_samples: int, micro_batch_size: int,
                      data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      num_workers: int = 0) -> Iterator[dict]:
        """Micro-batches of this data-parallel rank from ``consumed_samples`` on (global sample order
        is independent of the parallel layout, as Megatron's pretraining sampler). ``num_workers``
        (--num-workers) > 0 reads them in a torch DataLoader's worker processes: the same batches."""
        batches = _MicroBatchIndices(consumed_samples + data_parallel_rank * micro_batch_size, micro_batch_size,
                                     micro_batch_size * data_parallel_size, self.samples[phase])
        if num_workers == 0:
            return (_stack([self.sample(phase, i) for i in batch]) for batch in batches)
        return iter(torch.utils.data.DataLoader(
            _PhaseSamples(self, phase), batch_sampler=batches, num_workers=num_workers, collate_fn=_stack,
            pin_memory=torch.cuda.is_available()))  # as Megatron-LM's loader

    def report(self) -> list[dict]:
        """Per dataset and phase: documents, tokens available and planned, samples, epochs."""
        return list(self.report_rows)


class _MicroBatchIndices:
    """Sample indices of one rank's micro-batches: ``size`` from ``start``, every ``step``, below ``total``."""

    def __init__(self, start: int, size: int, step: int, total: int):
        self.start, self.size, self.step, self.total = start, size, step, total

    def __iter__(self):
        for start in range(self.start, self.total - self.size + 1, self.step):
            yield list(range(start, start + self.size))


class _PhaseSamples(torch.utils.data.Dataset):
    def __init__(self, data: TSTData, phase: str):
        self.data, self.phase = data, phase

    def __getitem__(self, index: int) -> dict:
        return self.data.sample(self.phase, index)


def _stack(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class _Failure:
    """A step that failed on this rank: ``shared`` goes to the other ranks, ``error`` is re-raised here."""

    def __init__(self, error: Exception):
        self.error = error
        # a ValueError (or a missing file) is a user's error: one line everywhere; anything else is a
        # crash, re-raised with its traceback on this rank and named on the others
        user_error = isinstance(error, (ValueError, FileNotFoundError))
        self.shared = ("user", str(error)) if user_error else ("crash", f"{type(error).__name__}: {error}")


def _attempt(step) -> _Failure | None:
    try:
        step()
    except Exception as error:
        return _Failure(error)
    return None


def _raise(failure, where: str):
    """Another rank's failure, raised here as the same one-line error."""
    kind, message = failure
    if kind == "user":
        raise ValueError(message)
    raise ValueError(f"building the dataset indices failed on {where} ({message}); see that rank's traceback")


def _check_cache_shared(probes):
    hidden = [os.path.dirname(probe) for probe in probes if not os.path.exists(probe)]
    if hidden:
        raise ValueError(
            f"the dataset index cache {hidden[0]} is not shared: rank {torch.distributed.get_rank()} on "
            f"{socket.gethostname()} does not see the files rank 0 writes there; give --data-cache-path a "
            "folder on a filesystem that every node sees")


def resolve_blend(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """--data-path as (prefixes, weights or None), every prefix's .bin and .idx present."""
    blend = get_blend_from_list(list(data_path))
    if not blend or not blend[0]:
        raise ValueError("--data-path is empty; give a dataset prefix or 'w1 prefix1 w2 prefix2 ...'")
    prefixes, weights = blend
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise FileNotFoundError(
                    f"dataset {prefix}{suffix} not found; --data-path takes the prefix that "
                    "tools/preprocess_data.py wrote (without .bin/.idx)"
                )
    return prefixes, weights


def dataset_files_identity(data_path: Sequence[str]) -> list[list[int]]:
    """Per dataset, the .bin and .idx sizes in bytes: a checkpoint records them so that a resume on a
    corpus rewritten under the same prefix is refused (its sample order would silently change)."""
    prefixes, _ = resolve_blend(data_path)
    return [[os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")] for prefix in prefixes]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_identity(tokenizer_type: str | None, tokenizer_model: str | None, vocab_size: int, eod: int,
                       files: Sequence[str] = (), settings: dict | None = None) -> dict:
    """What a checkpoint records of its tokenizer: type, vocabulary size, EOD and a digest of the
    tokenizer's files (a file, or the usual tokenizer files of a folder), not their path, so that
    moving a tokenizer is fine and swapping it for another of the same size is not; ``settings``:
    flags that change its ids (TikTokenizer's pattern and special tokens), recorded only when given."""
    digest, paths = None, [path for path in files if path]  # files: GPT2BPETokenizer's vocab and merges
    if tokenizer_model and os.path.exists(tokenizer_model):
        paths = [tokenizer_model] if os.path.isfile(tokenizer_model) else [
            os.path.join(tokenizer_model, name) for name in _TOKENIZER_FILES
            if os.path.isfile(os.path.join(tokenizer_model, name))]
    if paths or (tokenizer_model and os.path.exists(tokenizer_model)):
        hasher = hashlib.md5(usedforsecurity=False)
        for path in paths:
            hasher.update(os.path.basename(path).encode())
            with open(path, "rb") as handle:
                hasher.update(handle.read())
        digest = hasher.hexdigest()
    return dict(type=tokenizer_type or "NullTokenizer", vocab_size=int(vocab_size), eod=int(eod), files_md5=digest,
                **({"settings": settings} if settings else {}))


_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_INDEX_HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8


def check_indexed_files(prefix: str) -> None:
    """One-line errors for a .bin/.idx pair megatron-core would fail on with a bare assert or a numpy
    buffer error: a foreign or truncated .idx, another format version or dtype code, a .bin whose
    size is not the one its .idx describes (truncated, or written with another dtype)."""
    from megatron.core.datasets.indexed_dataset import DType

    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    remake = "preprocess the data again (tools/preprocess_data.py)"
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as handle:
        header = handle.read(_INDEX_HEADER_BYTES)
    if len(header) < _INDEX_HEADER_BYTES or header[:9] != _INDEX_MAGIC:
        raise ValueError(f"{idx_path} is not a Megatron indexed-dataset index (bad header); {remake}")
    version, dtype_code = int.from_bytes(header[9:17], "little"), header[17]
    if version != _INDEX_VERSION:
        raise ValueError(f"{idx_path} is index format version {version}; megatron-core 0.16.1 reads "
                         f"version {_INDEX_VERSION}: {remake} with this version's tools")
    try:
        dtype = DType.dtype_from_code(dtype_code)
    except ValueError:
        raise ValueError(f"{idx_path} names token dtype code {dtype_code}, which megatron-core does not "
                         f"know (codes {', '.join(str(d.value) for d in DType)}); {remake}") from None
    sequences = int.from_bytes(header[18:26], "little")
    documents = int.from_bytes(header[26:34], "little")
    expected_idx = _INDEX_HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if idx_size < expected_idx:
        raise ValueError(f"{idx_path} is truncated ({idx_size:,} bytes, its header describes "
                         f"{expected_idx:,}); {remake}")
    if sequences == 0:
        expected_bin = 0
    else:
        lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=_INDEX_HEADER_BYTES, shape=(sequences,))
        pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=_INDEX_HEADER_BYTES + 4 * sequences,
                             shape=(sequences,))
        itemsize = np.dtype(dtype).itemsize
        if sequences > 1 and lengths[0] > 0 and int(pointers[1] - pointers[0]) != int(lengths[0]) * itemsize:
            step = int(pointers[1] - pointers[0]) / int(lengths[0])
            raise ValueError(f"{idx_path} says its tokens are {np.dtype(dtype).name} ({itemsize} bytes) but its "
                             f"offsets advance {step:g} bytes a token: an .idx of another dtype, or a damaged "
                             f"one; {remake}")
        expected_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < expected_bin:
        raise ValueError(f"{bin_path} is shorter than its index describes ({bin_size:,} of {expected_bin:,} "
                         f"bytes): a truncated copy or an interrupted write; copy it again or {remake}")
    if bin_size > expected_bin:
        raise ValueError(f"{bin_path} holds {bin_size:,} bytes but {idx_path} describes {expected_bin:,} "
                         f"({np.dtype(dtype).name} tokens): the two files are not a pair; {remake}")


def largest_token_id(prefix: str, dtype, cache_dir: str | None = None) -> tuple[int, callable]:
    """The largest token id in ``prefix.bin`` and a function that caches it (by the file's size and
    mtime: one pass over a large corpus takes a while, so later runs and ranks read the cache). The
    caller caches only data it accepts, so a refused run leaves nothing behind."""
    bin_path = prefix + ".bin"
    status = os.stat(bin_path)
    key = f"{status.st_size}-{status.st_mtime_ns}"
    digest = hashlib.md5(os.path.abspath(bin_path).encode(), usedforsecurity=False).hexdigest()
    cache_path = os.path.join(cache_dir or os.path.join(prefix, "cache"), "token_range",
                              f"{os.path.basename(prefix)}-{digest}.json")

    def remember(largest):
        try:  # best effort: a read-only data folder just means scanning again next time
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            partial = f"{cache_path}.tmp{os.getpid()}"
            with open(partial, "w") as handle:
                json.dump({"key": key, "largest_token_id": largest}, handle)
            os.replace(partial, cache_path)
        except OSError:
            pass

    try:
        with open(cache_path) as handle:
            cached = json.load(handle)
        if cached.get("key") == key:
            return int(cached["largest_token_id"]), lambda largest: None
    except (OSError, ValueError, KeyError):
        pass
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if status.st_size else np.zeros(0, dtype)
    chunk = 1 << 26
    largest = max((int(tokens[start:start + chunk].max()) for start in range(0, len(tokens), chunk)), default=-1)
    return largest, remember


def _model_sample(raw: dict, plan: TSTPlan | None) -> dict[str, torch.Tensor]:
    """GPTDataset sample (tokens, labels, loss_mask of one sequence) -> the model's inputs.

    The loss mask is folded into the labels (IGNORE_INDEX) so it moves with its target through the
    bag shift."""
    tokens = raw["tokens"]
    labels = raw["labels"].masked_fill(raw["loss_mask"] == 0, IGNORE_INDEX)
    if plan is not None:
        tokens, labels = fold_sample(tokens[None], labels[None], plan.bag_size, plan.mode)
        tokens, labels = tokens[0], labels[0]
    return {"tokens": tokens, "labels": labels, "position_ids": torch.arange(tokens.shape[0])}
