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

import hashlib
import json
import math
import os
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


class _TokenizerInfo:
    """What GPTDatasetConfig needs of a tokenizer (vocabulary size, EOD, a cache identity)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        self.unique_identifiers = OrderedDict(vocab_size=self.vocab_size, eod=self.eod)


class PhaseDocumentsDataset(GPTDataset):
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
    return [(SUPERPOSITION, plan.switch_iter), (RECOVERY, plan.total_iters - plan.switch_iter)]


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
        for name, steps in _phases(plan, total_iters):
            self.samples[name] = steps * config.global_batch_size
            bag = plan.bag_size if (name == SUPERPOSITION and plan.mode != "output-only") else 1
            self.sample_length[name] = bag * config.seq_length + 1
        prefixes, weights = self._blend()
        split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(config.split))
        self._blend_spec = (prefixes, weights)
        self._dataset_config = {
            name: self._gpt_config(self.sample_length[name] - 1) for name in self.phase_names
        }
        self._valid_config = self._gpt_config(config.seq_length)
        self.report_rows = []
        # rank 0 builds (and caches) the indices first; the others then load them
        distributed = torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() != 0:
            torch.distributed.barrier()
        self._build(prefixes, weights, split_matrix)
        if distributed and torch.distributed.get_rank() == 0:
            torch.distributed.barrier()

    # -- construction -------------------------------------------------------------------------

    def _blend(self):
        blend = get_blend_from_list(list(self.config.data_path))
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
        weights = [1.0] * len(prefixes) if weights is None else weights
        total = sum(weights)
        return prefixes, [w / total for w in weights]

    def _gpt_config(self, sequence_length: int) -> GPTDatasetConfig:
        return GPTDatasetConfig(
            random_seed=self.config.seed,
            sequence_length=sequence_length,
            blend=self._blend_spec,  # also tells megatron-core these are real (cacheable) datasets
            split=self.config.split,
            path_to_cache=self.config.cache_dir,
            tokenizer=_TokenizerInfo(self.config.vocab_size, self.config.eod),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=self.config.eod_mask_loss,
            create_attention_mask=False,
        )

    def _build(self, prefixes, weights, split_matrix):
        per_phase = {name: [] for name in self.phase_names}
        valid = []
        for index, (prefix, weight) in enumerate(zip(prefixes, weights)):
            indexed = IndexedDataset(prefix, multimodal=False, mmap=True)
            documents = indexed.sequence_lengths.shape[0]
            train_range, valid_range = split_matrix[0], split_matrix[1]
            train_docs = np.arange(round(train_range[0] * documents), round(train_range[1] * documents),
                                   dtype=np.int32)
            requests = {name: int(math.ceil(math.ceil(self.samples[name] * weight) * (1 + _BLEND_SURPLUS)))
                        for name in self.phase_names}
            for name, docs in self._cut(indexed, train_docs, requests, index).items():
                self._check_size(prefix, name, indexed, docs, requests[name])
                per_phase[name].append(PhaseDocumentsDataset(
                    indexed, prefix, docs, requests[name], Split.train, self._dataset_config[name]))
            if valid_range is not None:
                valid_docs = np.arange(round(valid_range[0] * documents), round(valid_range[1] * documents),
                                       dtype=np.int32)
                if len(valid_docs):
                    valid.append(GPTDataset(indexed, prefix, valid_docs, None, Split.valid, self._valid_config))
        self.train = {name: self._blended(per_phase[name], weights, self.samples[name])
                      for name in self.phase_names}
        # every validation sample once, the datasets interleaved (integer weights = sample counts)
        self.valid = self._blended(valid, [len(d) for d in valid], None) if valid else None

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
        if epochs > 1 and not self.config.allow_repetition or available == 0:
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
                      data_parallel_rank: int = 0, data_parallel_size: int = 1) -> Iterator[dict]:
        """Micro-batches of this data-parallel rank from ``consumed_samples`` on (global sample order
        is independent of the parallel layout, as Megatron's pretraining sampler)."""
        step = micro_batch_size * data_parallel_size
        start = consumed_samples + data_parallel_rank * micro_batch_size
        total = self.samples[phase]
        while start + micro_batch_size <= total:
            samples = [self.sample(phase, i) for i in range(start, start + micro_batch_size)]
            yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
            start += step

    def report(self) -> list[dict]:
        """Per dataset and phase: documents, tokens available and planned, samples, epochs."""
        return list(self.report_rows)


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
