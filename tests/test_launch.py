"""The one-command two-phase launcher and the tst-to-ntp conversion, end to end on CPU."""

import os
import re

import numpy as np
import pytest
import torch

from megatron_tst import launch
from megatron_tst.conversion import tst_to_ntp
from tests.distributed import run_distributed
from tests.test_pretrain import args, records, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# TP=2 and TP=1 differ only in fp32 reduction order (row-parallel matmuls, the vocab-parallel MCE):
# over these 12 steps the logged losses differ by about one fp32 ulp (observed 8e-8 relative).
TP_LOSS_RTOL = 1e-6


def launched_records(save):
    first, _ = records(os.path.join(save, "superposition"))
    second, valid = records(os.path.join(save, "recovery"))
    return first + second, valid


def test_launcher_equals_an_in_process_switch_and_resumes_in_either_phase(corpus, tmp_path, capfd, tst_run,
                                                                         launched_tst_run):
    single, launched, interrupted = tst_run, launched_tst_run, str(tmp_path / "interrupted")
    reference, reference_valid = records(single)
    steps, valid = launched_records(launched)
    assert [r["phase"] for r in steps] == ["superposition"] * 6 + ["recovery"] * 18
    # fresh processes, converted checkpoint, plain GPTModel: the very same run, bit for bit
    assert [r["loss"] for r in steps] == [r["loss"] for r in reference]
    assert [r["lr"] for r in steps] == [r["lr"] for r in reference]
    assert [r["validation_loss"] for r in valid] == [r["validation_loss"] for r in reference_valid]

    assert launch.main(args(corpus, interrupted, "--exit-interval", "4")) == 0  # stops in phase 1
    assert "phase 1 stopped before the switch" in capfd.readouterr().out
    assert launch.main(args(corpus, interrupted, "--exit-interval", "15")) == 0  # converts, stops in phase 2
    assert launch.main(args(corpus, interrupted)) == 0  # the same command finishes the run
    assert [r["loss"] for r in launched_records(interrupted)[0]] == [r["loss"] for r in reference]


def test_launcher_with_two_processes_tensor_parallel(corpus, tmp_path):
    save = str(tmp_path / "tp2")
    assert launch.main(["--nproc-per-node", "2", "--master-port", "29631",
                        *args(corpus, save, "--tensor-model-parallel-size", "2", iters=12)]) == 0
    steps, _ = launched_records(save)
    assert [r["phase"] for r in steps] == ["superposition"] * 3 + ["recovery"] * 9
    # and it trains what the TP=1 run trains (an in-process switch: the launcher's equal at TP=1)
    single = str(tmp_path / "tp1")
    run(args(corpus, single, iters=12))
    reference = records(single)[0]
    assert [r["phase"] for r in steps] == [r["phase"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in steps], [r["loss"] for r in reference], rtol=TP_LOSS_RTOL)


def test_reinit_embeddings_at_switch_restarts_from_scratch_tables(corpus, tmp_path):
    kept, reinit = str(tmp_path / "kept"), str(tmp_path / "reinit")
    assert launch.main(args(corpus, kept, "--tst-ratio", "0.5", iters=26)) == 0
    assert launch.main(["--reinit-embeddings-at-switch", *args(corpus, reinit, "--tst-ratio", "0.5", iters=26)]) == 0
    kept_steps, reinit_steps = launched_records(kept)[0], launched_records(reinit)[0]
    assert [r["loss"] for r in kept_steps[:13]] == [r["loss"] for r in reinit_steps[:13]]  # same phase 1
    assert reinit_steps[13]["loss"] > kept_steps[13]["loss"] + 0.3  # fresh tables forget phase 1
    assert abs(reinit_steps[13]["loss"] - np.log(512)) < 0.3


def test_conversion_refuses_what_it_cannot_convert(corpus, tmp_path, tst_run):
    early, baseline = str(tmp_path / "early"), str(tmp_path / "baseline")
    run(args(corpus, early, "--exit-interval", "2"))
    with pytest.raises(ValueError, match="at iteration 2, not at the switch iteration 6"):
        tst_to_ntp(early, str(tmp_path / "out"))
    run(args(corpus, baseline, "--exit-interval", "2", tst=False))
    with pytest.raises(ValueError, match="is not a TST checkpoint"):
        tst_to_ntp(baseline, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=re.escape("no complete checkpoint under")):
        tst_to_ntp(str(tmp_path / "nothing"), str(tmp_path / "out"))
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "file").write_text("x")
    # a run past phase 1 (read only here): its newest checkpoint is at T, not the switch
    with pytest.raises(ValueError, match="not at the switch iteration"):
        tst_to_ntp(tst_run, str(tmp_path / "taken"))


def test_ratio_one_is_superposition_only_and_skips_recovery(corpus, tmp_path, capfd):
    save = str(tmp_path / "r1")
    assert launch.main(args(corpus, save, "--tst-ratio", "1.0", iters=8)) == 0
    assert "no recovery phase" in capfd.readouterr().out
    steps, valid = records(os.path.join(save, "superposition"))
    assert [r["phase"] for r in steps] == ["superposition"] * 8
    assert all(r["loss_minus_target_entropy"] == pytest.approx(r["loss"] - np.log(4)) for r in steps)
    assert [v["iteration"] for v in valid] == [8]  # the final evaluation is still next-token
    assert not os.path.exists(os.path.join(save, "recovery"))  # no conversion, no recovery job
    assert launch.main(args(corpus, save, "--tst-ratio", "1.0", iters=8)) == 0  # rerun: nothing left to do
    assert len(records(os.path.join(save, "superposition"))[0]) == 8


def _adam_state_around_reinit(rank, world_size, argv):
    """One real optimizer step, then the switch's re-initialisation: every parameter's Adam moments
    (this rank's shard) before and after, keyed by parameter name."""
    import dataclasses

    import torch

    from megatron.core.distributed import finalize_model_grads
    from megatron_tst import parallel
    from megatron_tst.arguments import parse_args
    from megatron_tst.pretrain import adam_moments, build_model, build_optimizer, reinitialise_embeddings, run_step
    from tests.conftest import VOCAB

    config = parse_args(argv)
    parallel.initialize(seed=1234)
    arch = dataclasses.replace(config.model.architecture(), vocab_size=VOCAB)
    chunks, model_config = build_model(config, arch, None)
    optimizer, _ = build_optimizer(config, chunks, model_config)
    model_config.no_sync_func, model_config.grad_scale_func = chunks[0].no_sync, optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, VOCAB - 1, (4, 33), generator=generator)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "position_ids": torch.arange(32).expand(4, 32).contiguous()}
    run_step(chunks, [iter([batch])], 1, config)
    optimizer.step()
    model = chunks[0].module
    named = dict(model.named_parameters())

    def moments():
        return {name: {k: v.clone() for m in adam_moments(optimizer, [p]) for k, v in m.items()
                       if k in ("exp_avg", "exp_avg_sq")} for name, p in named.items()}

    before = moments()
    fresh = reinitialise_embeddings([model], optimizer)
    return before, moments(), sorted(name for name, p in named.items() if any(p is f for f in fresh))


@pytest.mark.parametrize("world_size,extra", [(1, []), (2, ["--use-distributed-optimizer"])])
def test_reinit_at_switch_zeroes_only_the_new_tables_adam_moments(corpus, tmp_path, world_size, extra):
    argv = args(corpus, str(tmp_path / "unused"), "--untie-embeddings-and-output-weights", *extra, tst=False)
    for before, after, fresh in run_distributed(_adam_state_around_reinit, world_size, argv):
        assert fresh == ["embedding.word_embeddings.weight", "output_layer.weight"]
        assert any(before[name] for name in fresh)  # this rank holds state for at least one of them
        for name in before:
            assert before[name].keys() == after[name].keys()
            for key, value in after[name].items():
                if name in fresh:
                    assert torch.count_nonzero(before[name][key]) > 0 and torch.count_nonzero(value) == 0
                else:
                    assert torch.equal(value, before[name][key]), (name, key)
        kept = [name for name in before if name not in fresh and before[name]]
        assert kept  # the rest of the model has Adam state, and it was kept
