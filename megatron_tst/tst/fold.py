"""Turning raw token samples into TST inputs and targets (paper Listings 1 and 3).

A phase-1 sample holds ``s*L + 1`` raw tokens x_0 .. x_{sL}. Its inputs are folded into L bags of s
tokens, bag j = x_{js} .. x_{js+s-1}; latent position j predicts the next bag, x_{(j+1)s} ..
x_{(j+2)s-1}. Only the first target of the last latent position, x_{sL}, exists; the other s-1 are
ignored. Labels are always ``(b, L, slots)`` with ``IGNORE_INDEX`` where there is no target.

Modes (the paper's Section 5.2 ablation):
  ``full``         bag inputs, the whole next bag as targets (s slots).
  ``input-only``   bag inputs, one target per position: the first token of the next bag, x_{(j+1)s}.
  ``output-only``  token inputs x_0 .. x_{L-1} from an ordinary ``L + 1``-token sample (no extra
                   data); position t predicts the next s tokens x_{t+1} .. x_{t+s}, and targets past
                   x_L (the last s-1 positions' tails) are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MODES = ("full", "input-only", "output-only")


def check_bag_size(bag_size) -> int:
    if isinstance(bag_size, bool) or not isinstance(bag_size, int) or bag_size < 1:
        raise ValueError(f"bag size s must be an integer >= 1, got {bag_size!r}")
    return bag_size


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"TST mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def raw_sample_length(seq_length: int, bag_size: int, mode: str = "full") -> int:
    """Raw tokens one sample must hold so that the model sees ``seq_length`` positions."""
    check_bag_size(bag_size)
    check_mode(mode)
    if mode == "output-only":
        return seq_length + 1
    return bag_size * seq_length + 1


def fold_tokens(tokens: torch.Tensor, bag_size: int) -> torch.Tensor:
    """(b, s*L) -> (b, L, s): consecutive, non-overlapping bags (Listing 1)."""
    check_bag_size(bag_size)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D (batch, s*L), got shape {tuple(tokens.shape)}")
    batch, length = tokens.shape
    if length % bag_size:
        raise ValueError(f"token length {length} is not divisible by the bag size s={bag_size}")
    return tokens.reshape(batch, length // bag_size, bag_size)


def fold_labels(labels: torch.Tensor, bag_size: int) -> torch.Tensor:
    """Standard next-token labels (b, s*L), label[k] = x[k+1], -> next-bag targets (b, L, s).

    Listing 3: shift left by s-1 (the tail padded with IGNORE_INDEX) and view as bags, so slot i of
    latent j is label[js + s - 1 + i] = x[(j+1)s + i].
    """
    check_bag_size(bag_size)
    if labels.dim() != 2:
        raise ValueError(f"labels must be 2-D (batch, s*L), got shape {tuple(labels.shape)}")
    batch, length = labels.shape
    if length % bag_size:
        raise ValueError(f"label length {length} is not divisible by the bag size s={bag_size}")
    shift = bag_size - 1
    shifted = F.pad(labels, (0, shift), value=IGNORE_INDEX)[:, shift:]
    return shifted.reshape(batch, length // bag_size, bag_size)


def next_tokens_windows(labels: torch.Tensor, window: int) -> torch.Tensor:
    """Output-only targets: (b, L) next-token labels -> (b, L, window), slot i = label[t + i]."""
    check_bag_size(window)
    if labels.dim() != 2:
        raise ValueError(f"labels must be 2-D (batch, L), got shape {tuple(labels.shape)}")
    return F.pad(labels, (0, window - 1), value=IGNORE_INDEX).unfold(1, window, 1)


def split_sample(raw: torch.Tensor, bag_size: int, mode: str = "full"):
    """Raw samples (b, raw_sample_length) -> (tokens, labels) as the TST model takes them.

    tokens: (b, L, s) for ``full``/``input-only``, (b, L) for ``output-only``.
    labels: (b, L, s) for ``full``/``output-only``, (b, L, 1) for ``input-only``.
    """
    if raw.dim() != 2:
        raise ValueError(f"raw samples must be 2-D (batch, tokens), got shape {tuple(raw.shape)}")
    return fold_sample(raw[:, :-1], raw[:, 1:], bag_size, mode)


def fold_sample(inputs: torch.Tensor, labels: torch.Tensor, bag_size: int, mode: str = "full"):
    """``split_sample`` for inputs x[:-1] and next-token labels x[1:] given separately (the labels
    may already hold IGNORE_INDEX, e.g. a data loss mask, which then moves with its target)."""
    check_bag_size(bag_size)
    check_mode(mode)
    if mode == "output-only":
        return inputs, next_tokens_windows(labels, bag_size)
    if inputs.dim() == 2 and inputs.shape[1] % bag_size:
        raise ValueError(
            f"a {mode} sample must hold s*L+1 tokens; got {inputs.shape[1] + 1} tokens for s={bag_size}"
        )
    bag_labels = fold_labels(labels, bag_size)
    if mode == "input-only":
        bag_labels = bag_labels[..., :1]
    return fold_tokens(inputs, bag_size), bag_labels
