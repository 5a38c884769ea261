"""The two-phase plan: superposition for the first r*T optimizer steps, then next-token recovery."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_tst.tst.fold import check_bag_size, check_mode, raw_sample_length
from megatron_tst.tst.loss import Weighting, bag_weights, target_entropy

SUPERPOSITION, RECOVERY = "superposition", "recovery"


@dataclass(frozen=True)
class TSTPlan:
    """bag_size s, total_iters T and either ratio r in (0, 1] or switch_iter in [1, T].

    r = 1 (switch_iter = T) is a superposition-only run (the paper's r = 1.0 rows): no recovery."""

    bag_size: int
    total_iters: int
    ratio: float | None = None
    switch_iter: int | None = None
    loss_weighting: Weighting = "uniform"
    mode: str = "full"

    def __post_init__(self):
        check_bag_size(self.bag_size)
        check_mode(self.mode)
        if not isinstance(self.total_iters, int) or self.total_iters < 2:
            raise ValueError(f"total iterations must be an integer >= 2, got {self.total_iters!r}")
        if (self.ratio is None) == (self.switch_iter is None):
            raise ValueError("give exactly one of the TST ratio r or the TST switch iteration")
        if self.ratio is not None:
            if not 0.0 < self.ratio <= 1.0:
                raise ValueError(f"TST ratio r must be in (0, 1], got {self.ratio}")
            switch = self.total_iters if self.ratio == 1.0 else round(self.ratio * self.total_iters)
            if self.ratio < 1.0 and not 1 <= switch < self.total_iters:
                raise ValueError(
                    f"r={self.ratio} of {self.total_iters} iterations leaves no step in one phase; "
                    "use a ratio that gives at least one step to each (or r=1 for superposition only)"
                )
            object.__setattr__(self, "switch_iter", switch)
        elif not 1 <= self.switch_iter <= self.total_iters:
            raise ValueError(
                f"TST switch iteration must be in [1, {self.total_iters}], got {self.switch_iter}"
            )
        if not isinstance(self.loss_weighting, str):
            object.__setattr__(self, "loss_weighting", tuple(self.loss_weighting))
        bag_weights(self.target_slots, self.loss_weighting)

    @property
    def target_slots(self) -> int:
        """Targets per latent position: s (full, output-only: the next s tokens) or 1 (input-only)."""
        return 1 if self.mode == "input-only" else self.bag_size

    @property
    def has_recovery(self) -> bool:
        return self.switch_iter < self.total_iters

    @property
    def target_entropy(self) -> float:
        """The phase-1 loss floor: the entropy of the normalised slot weights (log s for uniform
        weights in full and output-only mode, 0 for input-only or "first"). Output-only positions
        predict the next s tokens with the same slot weights, so the same multi-hot target and floor
        (its last s-1 positions' ignored tails lower the true floor by O(s/L), as the last position
        does in full mode). Phase-1 loss minus this is the paper's KL form of the MCE, still not
        comparable with next-token losses."""
        return target_entropy(self.target_slots, self.loss_weighting)

    def phase(self, iteration: int) -> str:
        """Phase of the step that runs with ``iteration`` steps already done (0-based)."""
        return SUPERPOSITION if iteration < self.switch_iter else RECOVERY

    def sample_length(self, seq_length: int, iteration: int) -> int:
        """Raw tokens per sample for that step (the model always sees ``seq_length`` positions)."""
        if self.phase(iteration) == RECOVERY:
            return seq_length + 1
        return raw_sample_length(seq_length, self.bag_size, self.mode)

    def raw_tokens(self, seq_length: int, global_batch: int) -> dict[str, int]:
        """Raw data tokens each phase consumes (paper 2.4: TST tokens + recovery tokens)."""
        phase1 = self.switch_iter * global_batch * (self.sample_length(seq_length, 0) - 1)
        phase2 = (self.total_iters - self.switch_iter) * global_batch * seq_length  # 0 when r = 1
        return {SUPERPOSITION: phase1, RECOVERY: phase2}
