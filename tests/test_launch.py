"""The one-command two-phase launcher and the tst-to-ntp conversion, end to end on CPU."""

import os
import re

import numpy as np
import pytest

from megatron_tst import launch
from megatron_tst.conversion import tst_to_ntp
from tests.test_pretrain import args, records, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def launched_records(save):
    first, _ = records(os.path.join(save, "superposition"))
    second, valid = records(os.path.join(save, "recovery"))
    return first + second, valid


def test_launcher_equals_an_in_process_switch_and_resumes_in_either_phase(corpus, tmp_path, capfd):
    single, launched, interrupted = (str(tmp_path / name) for name in ("single", "launched", "interrupted"))
    run(args(corpus, single))
    assert launch.main(args(corpus, launched)) == 0
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


def test_reinit_embeddings_at_switch_restarts_from_scratch_tables(corpus, tmp_path):
    kept, reinit = str(tmp_path / "kept"), str(tmp_path / "reinit")
    assert launch.main(args(corpus, kept, "--tst-ratio", "0.5", iters=26)) == 0
    assert launch.main(["--reinit-embeddings-at-switch", *args(corpus, reinit, "--tst-ratio", "0.5", iters=26)]) == 0
    kept_steps, reinit_steps = launched_records(kept)[0], launched_records(reinit)[0]
    assert [r["loss"] for r in kept_steps[:13]] == [r["loss"] for r in reinit_steps[:13]]  # same phase 1
    assert reinit_steps[13]["loss"] > kept_steps[13]["loss"] + 0.3  # fresh tables forget phase 1
    assert abs(reinit_steps[13]["loss"] - np.log(512)) < 0.3


def test_conversion_refuses_what_it_cannot_convert(corpus, tmp_path):
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
    run(args(corpus, early))  # finish phase 1 and beyond: newest checkpoint is at T, not the switch
    with pytest.raises(ValueError, match="not at the switch iteration"):
        tst_to_ntp(early, str(tmp_path / "taken"))
