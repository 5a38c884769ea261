"""--rampup-batch-size START INCR SAMPLES, as Megatron-LM: the global batch grows from START by INCR
over SAMPLES consumed samples to --global-batch-size, read from megatron-core's
``RampupBatchsizeNumMicroBatchesCalculator`` at the samples consumed so far (both TST phases count,
as Megatron-LM counts every training sample). Iterations then follow from --train-samples by
Megatron-LM's ``update_train_iters``. The TST switch stays in steps (r x those iterations): the
samples phase 1 reads are the sum of its steps' batch sizes."""

from __future__ import annotations

from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator


class BatchSchedule:
    def __init__(self, global_batch: int, rampup: list | tuple | None = None):
        self.global_batch = global_batch
        self._ramp = None
        if rampup:
            start, increment, samples = (int(value) for value in rampup)
            # micro-batch 1, one data-parallel rank: only the global sizes are read here (setup checks
            # they divide into micro-batches); rank -1 keeps the calculator quiet
            self._ramp = RampupBatchsizeNumMicroBatchesCalculator(
                global_batch, 1, 1, False, -1, start, increment, samples)

    def at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples`` samples."""
        if self._ramp is None:
            return self.global_batch
        self._ramp.update(consumed_samples, consistency_check=False)
        return self._ramp.get_current_global_batch_size()

    def sizes(self, iterations: int) -> list[int]:
        """Global batch size of each of the first ``iterations`` steps."""
        sizes, consumed = [], 0
        for _ in range(iterations):
            sizes.append(self.at(consumed))
            consumed += sizes[-1]
        return sizes

    def iterations_for_samples(self, train_samples: int) -> int:
        """Megatron-LM's update_train_iters: ramp steps while within the ramp and the run, then whole
        batches of --global-batch-size (a partial last batch is dropped)."""
        if self._ramp is None:
            return train_samples // self.global_batch
        iterations = consumed = 0
        while consumed <= self._ramp.ramup_samples and consumed <= train_samples:
            consumed += self.at(consumed)
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // self.global_batch
        return iterations
