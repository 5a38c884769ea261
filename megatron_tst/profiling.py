"""--profile, as Megatron-LM's training loop: a torch.profiler trace of steps
--profile-step-start..--profile-step-end on the --profile-ranks, and on CUDA the same steps as an
nsys capture range (cudaProfilerStart/Stop with NVTX ranges, Megatron-LM's default without
--use-pytorch-profiler), so ``nsys profile --capture-range=cudaProfilerApi`` captures them too.

The torch.profiler schedule is Megatron-LM's (wait start-1, warm up 1, record end-start steps,
``prof.step()`` at the top of every iteration; steps counted from this job's first), so the trace
holds ``ProfilerStep#start`` .. ``ProfilerStep#end-1``; it is written with
``tensorboard_trace_handler`` to --tensorboard-dir as Megatron-LM does, else to ``<save>/profile``.
"""

from __future__ import annotations

import os

import torch


def trace_dir(logging, checkpoint) -> str | None:
    if logging.tensorboard_dir:
        return logging.tensorboard_dir
    return os.path.join(checkpoint.save, "profile") if checkpoint.save else None


def check(logging, checkpoint) -> None:
    """One-line errors for the profiling flags (``validate``)."""
    given = [flag for flag, value in (("--profile-step-start", logging.profile_step_start),
                                      ("--profile-step-end", logging.profile_step_end),
                                      ("--profile-ranks", logging.profile_ranks),
                                      ("--use-pytorch-profiler", logging.use_pytorch_profiler)) if value]
    if not logging.profile:
        if given:
            raise ValueError(f"{given[0]} needs --profile; give it, or drop {given[0]}")
        return
    start, end = steps(logging)
    if not 0 <= start < end:
        raise ValueError(f"--profile-step-start {start} and --profile-step-end {end}: need 0 <= start < end")
    try:
        [int(rank) for rank in logging.profile_ranks]
    except ValueError:
        raise ValueError(f"--profile-ranks takes integer ranks, got {' '.join(logging.profile_ranks)}") from None
    if trace_dir(logging, checkpoint) is None:
        raise ValueError("--profile writes its trace to --tensorboard-dir (or <--save>/profile); give one of them")


def steps(logging) -> tuple[int, int]:
    """Megatron-LM's defaults: steps 10 to 12."""
    start = 10 if logging.profile_step_start is None else logging.profile_step_start
    end = 12 if logging.profile_step_end is None else logging.profile_step_end
    return start, end


class _Off:
    def step(self, iteration: int) -> None:
        pass

    def stop(self) -> None:
        pass


class Profiler:
    """Call ``step(iteration)`` at the top of every training iteration and ``stop()`` at the end."""

    def __init__(self, logging, checkpoint):
        self.start, self.end = steps(logging)
        self.directory = trace_dir(logging, checkpoint)
        self.cuda = torch.cuda.is_available()
        self._nvtx = None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=max(self.start - 1, 0), warmup=1 if self.start > 0 else 0,
                                             active=self.end - self.start, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.directory),
            record_shapes=True, with_stack=True)
        self._prof.start()

    def step(self, iteration: int) -> None:
        self._prof.step()
        if not self.cuda:
            return
        if iteration == self.start:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()
        elif iteration == self.end:
            self._stop_nvtx()

    def _stop_nvtx(self) -> None:
        if self._nvtx is not None:
            torch.cuda.cudart().cudaProfilerStop()
            self._nvtx.__exit__(None, None, None)
            self._nvtx = None

    def stop(self) -> None:
        """Ends the trace (written now if the run stopped inside the recorded steps)."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
        if self.cuda:
            self._stop_nvtx()


def profiler(logging, checkpoint, rank: int):
    """The profiler of this rank: a real one on --profile-ranks (default [0]) with --profile."""
    ranks = [int(r) for r in logging.profile_ranks] or [0]
    if logging.profile and rank in ranks:
        return Profiler(logging, checkpoint)
    return _Off()
