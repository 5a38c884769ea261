"""Data and expert parallelism against one rank, through the real training entry (pretrain), and a
distributed-optimizer checkpoint continued at another layout.

tiny-moe with the load-balancing loss on (coefficient 1e-2): a single-rank run, a DP=2 run and an
EP=2 run (DP=2 for the dense weights) continue the same single-rank checkpoint on the same global
batch (8 samples: two micro-batches on one rank, one per rank at DP=2/EP=2) through the last
superposition steps and into recovery. Every step's loss and every gradient the optimizer is given
(embedding, attention, router, experts gathered over EP ranks, output head) must match the
single-rank run.
"""

import re
import shutil

import numpy as np
import pytest
import torch

from megatron_tst.arguments import parse_args
from megatron_tst.pretrain import pretrain
from tests.distributed import run_distributed
from tests.test_pretrain import args, records, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ITERS = 6  # switch at 3: steps 2-3 superposition, 4-6 recovery (step 1 makes the shared checkpoint)
# the preset's own shape (QK-norm, untied output head: the CLI's switches are off unless given)
MOE = ["--model-preset", "tiny-moe", "--qk-layernorm", "--untie-embeddings-and-output-weights",
       "--moe-aux-loss-coeff", "1e-2", "--tst-ratio", "0.5"]
NUM_EXPERTS = 4


def _global_name(name: str, ep_rank: int, ep_size: int) -> str:
    """Expert parameters by global expert id (local_experts.<i> on EP rank r is r * E/ep + i)."""
    match = re.search(r"\.local_experts\.(\d+)\.", name)
    if match is None:
        return name
    expert = ep_rank * (NUM_EXPERTS // ep_size) + int(match.group(1))
    return name[:match.start()] + f".experts.{expert}." + name[match.end():]


def capture_worker(rank, world_size, argv):
    """pretrain() as is, recording the gradients handed to optimizer.step() at every step."""
    import megatron_tst.pretrain as entry
    from megatron.core import parallel_state

    steps, original = [], entry.build_optimizer

    def build_optimizer(config, chunks, model_config):
        optimizer, scheduler = original(config, chunks, model_config)
        step = optimizer.step

        def step_and_record():
            ep_rank = parallel_state.get_expert_model_parallel_rank()
            ep_size = parallel_state.get_expert_model_parallel_world_size()
            steps.append({_global_name(name, ep_rank, ep_size): param.main_grad.detach().clone()
                          for chunk in chunks for name, param in chunk.module.named_parameters()})
            return step()

        optimizer.step = step_and_record
        return optimizer, scheduler

    entry.build_optimizer = build_optimizer
    result = pretrain(parse_args(argv))
    return dict(iteration=result["iteration"], grads=steps)


def _continue(corpus, start, directory, *layout, world_size=1):
    shutil.copytree(start, directory)
    ranks = run_distributed(capture_worker, world_size, args(corpus, directory, *MOE, *layout, iters=ITERS))
    assert all(r["iteration"] == ITERS for r in ranks)
    return records(directory)[0], ranks


def _merged_grads(ranks):
    """One dict per step: every parameter's gradient, the replicated ones checked equal on all ranks."""
    merged = []
    for step in range(len(ranks[0]["grads"])):
        grads = {}
        for rank in ranks:
            for name, grad in rank["grads"][step].items():
                if name in grads:
                    assert torch.equal(grads[name], grad), f"{name} differs between data-parallel ranks"
                grads[name] = grad
        merged.append(grads)
    return merged


@pytest.fixture(scope="module")
def single_rank_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("vs_single")
    start = str(root / "start")
    run(args(corpus, start, *MOE, "--exit-interval", "1", iters=ITERS))
    steps, ranks = _continue(corpus, start, str(root / "single"))
    return root, start, steps, _merged_grads(ranks)


# fp32 throughout. DP=2 computes the same two micro-batches as one rank and adds their gradients
# (g0 + g1, exact in either order for two addends), so it must be bit-identical. EP=2 batches an
# expert's tokens from both micro-batches into one matmul, another fp32 summation order, which
# four Adam steps carry on (observed: 8e-6 of a tensor's largest gradient, 4e-8 relative on the
# losses). Layout changes after a checkpoint: observed 8e-8 relative on the losses (one fp32 ulp).
TOLERANCES = {"dp2": (0.0, 0.0), "ep2": (1e-4, 1e-6)}  # (of a tensor's largest gradient, loss relative)
LOSS_RTOL = 1e-6


@pytest.mark.parametrize("layout", [["dp2"], ["ep2", "--expert-model-parallel-size", "2"]], ids=["dp2", "ep2"])
def test_two_ranks_equal_one_rank_losses_and_all_gradients(corpus, single_rank_run, layout):
    root, start, reference_steps, reference_grads = single_rank_run
    steps, ranks = _continue(corpus, start, str(root / layout[0]), *layout[1:], world_size=2)
    assert [r["iteration"] for r in steps] == list(range(1, ITERS + 1))  # step 1: the shared start
    assert [r["phase"] for r in steps] == [r["phase"] for r in reference_steps] == \
        ["superposition"] * 3 + ["recovery"] * 3
    grad_rtol, loss_rtol = TOLERANCES[layout[0]]
    np.testing.assert_allclose([r["loss"] for r in steps], [r["loss"] for r in reference_steps], rtol=loss_rtol, atol=0)
    grads = _merged_grads(ranks)
    assert len(grads) == len(reference_grads) == ITERS - 1
    kinds = set()
    for step, (got, want) in enumerate(zip(grads, reference_grads)):
        assert sorted(got) == sorted(want)
        for name, expected in want.items():
            scale = expected.abs().max()
            assert scale > 0, f"step {step + 2}: {name} has no gradient"
            error = (got[name] - expected).abs().max()
            assert error <= grad_rtol * scale, f"step {step + 2}: {name}: {error:.3g} vs scale {scale:.3g}"
            kinds.update(kind for kind in ("router", "self_attention", "experts", "embedding", "output_layer")
                         if kind in name)
    assert kinds == {"router", "self_attention", "experts", "embedding", "output_layer"}


DENSE_DO = ["--model-preset", "tiny", "--tst-ratio", "0.5", "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def distributed_optimizer_runs(corpus, tmp_path_factory):
    """DP=2 with the distributed optimizer (Adam state sharded over the two ranks): a whole run, and
    one stopped at step 2."""
    root = tmp_path_factory.mktemp("relayout")
    whole, stopped = str(root / "whole"), str(root / "stopped")
    run(args(corpus, whole, *DENSE_DO, iters=ITERS), world_size=2)
    run(args(corpus, stopped, *DENSE_DO, "--exit-interval", "2", iters=ITERS), world_size=2)
    return root, records(whole)[0], stopped


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_distributed_optimizer_checkpoint_continues_at_another_layout(corpus, distributed_optimizer_runs, layout):
    """The DP=2 distributed-optimizer checkpoint continued at TP=2 or PP=2 (the Adam state resharded
    over other ranks and shapes) retraces the uninterrupted DP=2 run through the phase switch."""
    root, reference, stopped = distributed_optimizer_runs
    moved = str(root / f"moved_{layout[0]}")
    shutil.copytree(stopped, moved)
    run(args(corpus, moved, *DENSE_DO, *layout, iters=ITERS), world_size=2)
    resumed = records(moved)[0]
    assert [r["iteration"] for r in resumed] == list(range(1, ITERS + 1))
    assert [r["phase"] for r in resumed] == [r["phase"] for r in reference]
    assert [r["loss"] for r in resumed[:2]] == [r["loss"] for r in reference[:2]]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=LOSS_RTOL)


MOE_DO = [*MOE, "--use-distributed-optimizer"]


def test_moe_distributed_optimizer_checkpoint_continues_at_another_expert_layout(corpus, tmp_path):
    """A MoE run's distributed-optimizer checkpoint saved at EP=2 continued at EP=1 (DP=2) with its
    Adam state retraces the uninterrupted EP=2 run: the expert weights are in megatron-core's expert
    optimizer at every EP size, so the sharded optimizer state has one structure."""
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    ep2 = ["--expert-model-parallel-size", "2"]
    run(args(corpus, whole, *MOE_DO, *ep2, iters=ITERS), world_size=2)
    run(args(corpus, stopped, *MOE_DO, *ep2, "--exit-interval", "2", iters=ITERS), world_size=2)
    run(args(corpus, stopped, *MOE_DO, iters=ITERS), world_size=2)  # EP=1, DP=2 from step 3
    reference, resumed = records(whole)[0], records(stopped)[0]
    assert [r["iteration"] for r in resumed] == list(range(1, ITERS + 1))
    assert [r["phase"] for r in resumed] == [r["phase"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=LOSS_RTOL)
