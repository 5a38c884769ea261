"""What the GPU path needs, shown on CPU where CPU can show it: pipeline-stage seeds, the platform
layer's optimizer fix keyed on Transformer Engine/Apex (not on the device), Megatron-LM's overlap
options, one host synchronisation per step, and the one-line refusals of what a GPU run cannot do.
The GPU itself is exercised by tests/test_gpu.py (``pytest -m gpu``)."""

import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_tst import device
from megatron_tst.arguments import check_fp8, parse_args
from tests.conftest import VOCAB
from tests.distributed import run_distributed
from tests.test_pretrain import args, records, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234
FOUR_LAYERS = dict(num_layers=4)


# ---- seeds ---------------------------------------------------------------------------------------

def _stage_state(pre_process, post_process, num_layers, pipeline_stages=1):
    from megatron_tst.models import build_gpt_model, preset, transformer_config

    arch = preset("tiny", num_layers=num_layers)
    # the scaled init of the output projections depends on the whole model's depth (4 layers)
    scaled_init = transformer_config(preset("tiny", num_layers=4)).output_layer_init_method
    config = transformer_config(arch, output_layer_init_method=scaled_init,
                                pipeline_model_parallel_size=pipeline_stages)
    model = build_gpt_model(arch, config, tst=False, pre_process=pre_process, post_process=post_process)
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}


def _pipeline_stage_weights(rank, world_size):
    """A 4-layer model over 2 pipeline stages: each rank's stage (2 layers)."""
    from megatron.core import parallel_state

    from megatron_tst import parallel

    parallel.initialize(pipeline_model_parallel_size=world_size, seed=SEED)
    return _stage_state(parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(),
                        num_layers=4, pipeline_stages=world_size)


def _single_process_weights(rank, world_size):
    """In one process: the full 4-layer model at SEED; each stage built alone (2 layers) from the
    seed Megatron-LM gives it (SEED + 100 x stage); and stage 1 from SEED (a missing offset)."""
    from megatron_tst import parallel

    def stage(seed, first, last):
        parallel.initialize(seed=seed)
        return _stage_state(first, last, num_layers=2)

    parallel.initialize(seed=SEED)
    full = _stage_state(True, True, num_layers=4)
    return dict(full=full, stage0=stage(SEED, True, False), stage1=stage(SEED + 100, False, True),
                stage1_unshifted=stage(SEED, False, True))


@pytest.mark.slow
def test_pipeline_stages_draw_from_their_own_seeds():
    stages = run_distributed(_pipeline_stage_weights, 2)
    reference = run_distributed(_single_process_weights, 1)[0]
    for rank, expected in ((0, reference["stage0"]), (1, reference["stage1"])):
        assert stages[rank].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(stages[rank][name], tensor), (rank, name)
    # stage 0 is the same-seed PP=1 model's first half exactly; stage 1 is not its second half
    full = reference["full"]
    assert all(torch.equal(t, full[n]) for n, t in stages[0].items() if "layers" in n or "embedding" in n)
    layer_2 = full["decoder.layers.2.self_attention.linear_qkv.weight"]
    assert not torch.equal(stages[1]["decoder.layers.0.self_attention.linear_qkv.weight"], layer_2)
    # without the offset stage 1 would start from stage 0's seed: two equal-shape stages, equal layers
    unshifted = reference["stage1_unshifted"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert not torch.equal(stages[1]["decoder.layers.0.self_attention.linear_qkv.weight"], unshifted)


# ---- platform layer on a GPU machine without Transformer Engine or Apex ---------------------------

def test_the_torch_adam_checkpoint_fix_is_keyed_on_te_and_apex_not_on_the_device():
    """A process that sees CUDA but neither TE nor Apex gets the distributed-optimizer fix (M4) and
    none of the CPU patches."""
    script = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "import megatron_tst\n"
        "from megatron_tst.platform import cpu\n"
        "cpu.install_megatron()\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, HAVE_APEX_OR_TE\n"
        "print(HAVE_APEX_OR_TE, DistributedOptimizer.load_state_dict.__module__, cpu._mode is None)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "megatron_tst.platform.cpu", "True"]


# ---- Megatron-LM's overlap options ---------------------------------------------------------------

@pytest.mark.slow
def test_overlapped_grad_reduce_and_param_gather_train_save_and_resume_as_the_plain_run(corpus, tmp_path):
    """DP=2 with the distributed optimizer: the overlapped run (stopped at iteration 4 and resumed)
    gives the plain uninterrupted run's losses bit for bit, validation included. A checkpoint or an
    evaluation taken while the parameter all-gather is still pending would not."""
    overlap = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
               "--eval-interval", "3"]
    plain_dir, overlap_dir = str(tmp_path / "plain"), str(tmp_path / "overlap")
    run(args(corpus, plain_dir, "--use-distributed-optimizer", "--eval-interval", "3", "--save-interval", "4",
             iters=8), world_size=2)
    run(args(corpus, overlap_dir, *overlap, "--exit-interval", "4", iters=8), world_size=2)
    run(args(corpus, overlap_dir, *overlap, iters=8), world_size=2)
    plain, overlapped = records(plain_dir), records(overlap_dir)
    assert [r["loss"] for r in overlapped[0]] == [r["loss"] for r in plain[0]]
    assert [r["validation_loss"] for r in overlapped[1]] == [r["validation_loss"] for r in plain[1]]
    assert len(plain[1]) == 3  # at 3, 6 and 8: the checkpoint at 4 follows no evaluation
    # the checkpoints' model weights (what a weights-only load or an export reads) are the same too
    for iteration in (4, 8):
        expected = _model_weights(os.path.join(plain_dir, f"iter_{iteration:07d}"))
        actual = _model_weights(os.path.join(overlap_dir, f"iter_{iteration:07d}"))
        assert expected.keys() == actual.keys() and len(expected) >= 5
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), (iteration, name)


@pytest.mark.slow
def test_a_bf16_run_saves_resumes_as_the_plain_run_and_holds_every_weight_in_bf16(corpus, tmp_path):
    """--bf16 as Megatron-LM runs it (Float16Module: torch norms are built in fp32 and would
    otherwise stay so): the mixed-precision optimizer's checkpoint maps every fp32 main copy to a
    model tensor (with an fp32 norm left in the model, saving failed: 'Param id .. does not match
    any model sharded param'), and a run stopped at 4 and resumed gives the uninterrupted run's
    losses bit for bit."""
    whole_dir, stopped_dir = str(tmp_path / "whole"), str(tmp_path / "stopped")
    run(args(corpus, whole_dir, "--bf16", "--save-interval", "4", iters=8))
    run(args(corpus, stopped_dir, "--bf16", "--exit-interval", "4", iters=8))
    run(args(corpus, stopped_dir, "--bf16", iters=8))
    whole, stopped = records(whole_dir), records(stopped_dir)
    assert [r["iteration"] for r in stopped[0]] == list(range(1, 9))
    assert [r["loss"] for r in stopped[0]] == [r["loss"] for r in whole[0]]
    assert [r["validation_loss"] for r in stopped[1]] == [r["validation_loss"] for r in whole[1]]
    weights = _model_weights(os.path.join(whole_dir, "iter_0000008"))
    assert any("layernorm" in name for name in weights)
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def _model_weights(checkpoint: str) -> dict:
    """The model tensors of a torch_dist checkpoint, read with torch.distributed.checkpoint alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(checkpoint)
    metadata = reader.read_metadata().state_dict_metadata
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.items()
             if isinstance(meta, TensorStorageMetadata) and name.startswith(("embedding.", "decoder.", "output_layer."))}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def test_overlap_defaults_and_switches():
    from megatron_tst.arguments import overlap_settings

    base = ["--model-preset", "tiny", "--seq-length", "32"]
    assert overlap_settings(parse_args(base)) == dict(overlap_grad_reduce=False, overlap_param_gather=False)
    assert overlap_settings(parse_args(base + ["--overlap-grad-reduce"]))["overlap_grad_reduce"]
    with pytest.raises(ValueError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        parse_args(base + ["--overlap-param-gather"])


# ---- one host synchronisation per step -----------------------------------------------------------

class _HostReads(TorchFunctionMode):
    """Counts tensor-to-host reads made from megatron_tst's own code (where a GPU would sync)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.nonzero, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS or (func is torch.Tensor.__setitem__ and isinstance(args[1], torch.Tensor)
                                  and args[1].dtype == torch.bool):
            frame = sys._getframe(1)
            while frame and "torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame and frame.f_code.co_name == "check_label_range":  # runs on host labels only (free there;
                return func(*args, **(kwargs or {}))                   # a GPU run's labels skip it)
            # the data pipeline builds host tensors by design; everything else runs on the device
            path = frame.f_code.co_filename if frame else ""
            if f"{os.sep}megatron_tst{os.sep}" in path and f"{os.sep}data{os.sep}" not in path:
                self.sites.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def _host_reads_per_step(corpus, save, micro_batch_size):
    from megatron_tst import parallel
    from megatron_tst.pretrain import pretrain

    reads = _HostReads()
    argv = args(corpus, save, iters=4, tst=True)
    argv[argv.index("--micro-batch-size") + 1] = str(micro_batch_size)
    argv[argv.index("--eval-interval") + 1] = "100"
    with reads:
        pretrain(parse_args(argv + ["--save-interval", "100"]))
    parallel.shutdown()
    return reads.sites


@pytest.mark.slow
def test_the_training_step_reads_the_device_once_whatever_the_micro_batches(corpus, tmp_path):
    """Phase 1 and phase 2 steps with 2 and with 8 micro-batches per step: megatron_tst's own code
    reads a tensor back to the host the same number of times (once per step, the logged numbers)."""
    few = _host_reads_per_step(corpus, str(tmp_path / "few"), micro_batch_size=4)
    many = _host_reads_per_step(corpus, str(tmp_path / "many"), micro_batch_size=1)
    assert sorted(few) == sorted(many)
    files = [site.split(":")[0] for site in few]
    # 4 steps and the final validation in pretrain.py; the gradient norm megatron-core's step takes as a
    # float, one read per step in optimizer.py (megatron-core's own path reads once per parameter tensor)
    assert (files.count("pretrain.py"), files.count("optimizer.py"), len(files)) == (5, 4, 9), few


# ---- placement ------------------------------------------------------------------------------------

def test_on_cpu_batches_and_models_stay_where_they_are():
    batch = {"tokens": torch.arange(6).view(2, 3)}
    assert device.batch_to_device(batch) is batch
    module = torch.nn.Linear(2, 2)
    assert device.module_to_device(module) is module and device.current() == torch.device("cpu")
    assert device.zeros(2, dtype=torch.float64).device == torch.device("cpu")


# ---- refusals before any process group ------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--fp8-format", "hybrid"], "--fp8-format needs Transformer Engine, which is not installed"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "--sequence-parallel needs Transformer Engine's layers"),
    (["--transformer-impl", "transformer_engine"], "needs Transformer Engine, which is not installed"),
    (["--overlap-grad-reduce", "--no-overlap-grad-reduce"], "contradict each other"),
])
def test_gpu_only_settings_are_refused_in_one_line(tmp_path, capsys, extra, message):
    from megatron_tst.pretrain import main

    code = main(["--model-preset", "tiny", "--vocab-size", str(VOCAB), "--tokenizer-type", "NullTokenizer",
                 "--seq-length", "32", "--data-path", str(tmp_path / "none"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("recipe,capability,message", [
    ("mxfp8", (9, 0), "mxfp8 needs a Blackwell GPU"),
    ("blockwise", (8, 9), "blockwise needs a Hopper or newer GPU"),
    ("delayed", (8, 0), "needs an Ada, Hopper or Blackwell GPU"),
    ("delayed", None, "needs a CUDA GPU"),
])
def test_fp8_recipes_the_gpu_cannot_run_are_refused(recipe, capability, message):
    with pytest.raises(ValueError, match=message):
        check_fp8("hybrid", recipe, "transformer_engine", capability)


@pytest.mark.parametrize("recipe,capability", [("mxfp8", (10, 0)), ("tensorwise", (9, 0)), ("delayed", (8, 9)),
                                               ("blockwise", (9, 0))])
def test_fp8_recipes_the_gpu_can_run_pass(recipe, capability):
    check_fp8("hybrid", recipe, "transformer_engine", capability)


def test_recipe_flags_for_a_gpu_cluster_parse_on_any_machine():
    """Flag validation does not depend on this machine (recipes are checked on CPU); what the
    machine cannot run is refused by check_environment, which pretrain and the launcher call."""
    from megatron_tst.arguments import check_environment

    config = parse_args(["--model-preset", "tiny", "--seq-length", "32", "--tensor-model-parallel-size", "2",
                         "--sequence-parallel", "--fp8-format", "hybrid"])
    with pytest.raises(ValueError, match="--sequence-parallel needs Transformer Engine's layers|--fp8-format needs"):
        check_environment(config)
    with pytest.raises(ValueError, match="--fp8-recipe nope is not one of"):
        parse_args(["--model-preset", "tiny", "--seq-length", "32", "--fp8-recipe", "nope"])


# ---- the GPU check script, its benchmarks and its summary, checked here on CPU -----------------------

def _gpu_check(out, **env):
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable, **env))


@pytest.mark.slow
def test_the_gpu_check_dry_run_measures_the_headline_and_keeps_its_budget(tmp_path, capsys):
    """tools/gpu_check.sh with GPU_CHECK_DRY_RUN=1 runs the GPU sequence at tiny shapes on CPU: the
    headline step (our attention, megatron-core's, the TST step, the loss kernels, the profile, the
    layouts) writes its JSON, the summary flags the figures as a dry run; with no budget left every
    step is skipped, not run."""
    import json

    out = tmp_path / "out"
    done = _gpu_check(out, GPU_CHECK_DRY_RUN="1", GPU_CHECK_ONLY="headline")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = (out / "steps.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in steps[1:]] == [["headline", "ok"]]
    head = json.loads((out / "bench_gpu.json").read_text())
    assert head["sections_done"] == ["steps", "memory", "local", "losses", "profile", "layouts"]
    attention = {row["step"]: row["core_attention"] for row in head["steps"]}
    assert attention == {"gptmodel": "SDPAttention", "tst-ntp": "SDPAttention", "tst-s6": "SDPAttention",
                         "gptmodel-local": "DotProductAttention"}
    assert all(row["fused_adamw"] for row in head["steps"])
    assert {(row["s"], row["method"]) for row in head["losses"]} >= {(16, "single-s16"), (16, "mce-s16"),
                                                                   (16, "megatron-fused"), (1, "single-s1")}
    assert sorted(head["profile"]) == ["gptmodel", "tst-s6"]
    # the top ops by self time hold a matmul (which ranks first varies with the machine's load)
    assert all("aten::mm" in table or "aten::addmm" in table for table in head["profile"].values())
    assert [(row["layout"], row["samples"]) for row in head["layouts"]] == [("2x2", 4), ("4x1", 4)]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("**Dry run") and "| TST phase-1 step / baseline step (tst-s6) |" in summary
    assert summary in done.stdout  # printed at the end too

    spent = _gpu_check(tmp_path / "spent", GPU_CHECK_DRY_RUN="1", GPU_CHECK_ONLY="headline linear",
                       GPU_CHECK_BUDGET_S="0")
    assert spent.returncode == 0, spent.stderr[-3000:]
    assert [line.split("\t")[:2] for line in (tmp_path / "spent" / "steps.tsv").read_text().splitlines()[1:]] == [
        ["headline", "skipped (budget spent)"], ["linear", "skipped (budget spent)"]]

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import bench_gpu

    assert bench_gpu.main([]) == 1  # without --quick it measures a GPU only
    assert capsys.readouterr().err.strip().startswith("error: examples/bench_gpu.py measures a CUDA GPU")


def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore"))
    assert done.returncode == 1 and "torch sees no CUDA GPU here" in done.stderr


def _write(path, value):
    import json

    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _step(name, ms, mfu, **extra):
    return dict(step=name, median_ms=ms, mfu=mfu, raw_tokens_per_s=1000.0, core_attention="SDPAttention",
                fused_adamw=True, micro_batch_size=4, micro_batches=2, model_flags=[], **extra)


def test_the_gpu_summary_judges_each_target_from_the_runs_files(tmp_path):
    """tools/gpu_summary.py on a made-up OUTDIR: each target's pass/FAIL against its bound (both sides
    of it), info rows, out of memory, skipped and failed tests, and 'missing' for what no step measured."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_summary

    args = dict(preset="270M", seq_length=2048, micro_batch_size=4, micro_batches=2, vocab=128256, loss_positions=8192)
    _write(tmp_path / "environment.txt", "NVIDIA H100 80GB HBM3\n")
    _write(tmp_path / "bench_gpu.json", dict(args=args, loss_kernel_compile="failed, eager fallback: no gcc", steps=[
        _step("gptmodel", 100.0, 0.31, peak_memory_gib=20.0),
        _step("tst-s6", 104.0, 0.30, vs_gptmodel_medians=1.04, vs_gptmodel_per_round=1.031),
        _step("gptmodel-local", 380.0, 0.08, peak_memory_gib=50.0, ours_vs_local=0.263)], losses=[
        dict(s=16, method="single-s16", median_ms=12.0, vs_megatron_fused=0.94, peak_mib=2000.0),
        dict(s=16, method="mce-s16", median_ms=17.7, vs_megatron_fused=1.38, peak_mib=6000.0),
        dict(s=1, method="single-s1", median_ms=13.0, vs_megatron_fused=1.01, peak_mib=2000.0)]))
    _write(tmp_path / "bench_3b.json", dict(steps=[], out_of_memory=dict(section="steps", error="CUDA out of memory")))
    _write(tmp_path / "bench_linear.json", [dict(vocab=128256, positions=8192, bag=16, time_ms={
        "linear-fused-compiled": 30.0, "linear-megatron-fused": 28.0, "linear-mce": 35.0}, peak_mib={
        "linear-fused-compiled": {"alloc": 700.0}, "linear-megatron-fused": {"alloc": 8000.0}})])
    _write(tmp_path / "bench_fusion.json", dict(loss_fusion=[
        dict(step="tst-s6", micro_batch_size=4, output_layer_loss_fusion=False, median_ms=60.0, peak_memory_gib=30.0),
        dict(step="tst-s6", micro_batch_size=4, output_layer_loss_fusion=True, median_ms=57.0, peak_memory_gib=18.0),
        dict(step="tst-s6", micro_batch_size=8, output_layer_loss_fusion=False, out_of_memory=True),
        dict(step="tst-s6", micro_batch_size=8, output_layer_loss_fusion=True, median_ms=110.0, peak_memory_gib=31.0)]))
    _write(tmp_path / "tests-fast.log", "tests/test_gpu_fast_step.py::test_adamw_stays_fused_after_save_and_resume"
           "[optimizer] PASSED [ 10%]\ntests/test_gpu_fast_step.py::test_adamw_stays_fused_after_save_and_resume"
           "[distributed-optimizer] PASSED [ 20%]\ntests/test_gpu_loss_kernels.py::test_x FAILED [ 30%]\n")
    _write(tmp_path / "tests-rest.log", "tests/test_te.py::test_y SKIPPED (needs TE) [ 50%]\n")
    _write(tmp_path / "bench_peer.json", "{truncated")  # a step killed while writing: absent, not a crash
    _write(tmp_path / "steps.tsv", "step\tstatus\tseconds\tlimit_s\nheadline\tok\t100\t240\npeer\ttimed out\t120\t120\n")

    assert gpu_summary.main([str(tmp_path), "--quiet"]) == 0
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {row["target"].split(" (")[0]: row["status"] for row in summary["targets"]}
    assert status["MFU, --attention-backend auto"] == "pass"  # 31% >= 30%
    assert status["MFU, --attention-backend local"] == "info"
    assert status["TST phase-1 step / baseline step"] == "FAIL"  # 1.031 per round > 1.03 (medians not used)
    assert status["MFU, 3B preset"] == "FAIL"  # out of memory
    assert status["tokens/s, ours / transformers Llama"] == "missing"
    assert status["fused AdamW in every benchmark step"] == "pass"
    assert status["fused AdamW after a save and resume"] == "pass"
    assert status["top kernels of one baseline and one TST step"] == "missing"
    assert status["the loss kernels ran compiled"] == "FAIL"  # their figures are the eager fallback's
    assert status["single-kernel MCE s=16 / megatron-core fused CE"] == "pass"  # 0.94 <= 1.0
    assert status["single kernel s=1"] == "FAIL"  # 1.01 > 1.0
    assert status["fused output layer + MCE, peak"] == "pass"  # 0.68 GiB, 0.0875x
    assert status["fused output layer + MCE, time /"] == "pass"  # 1.071 <= 1.1
    assert status["tst-s6: micro-batch 8 with --output-layer-loss-fusion in the memory of 4 without"] == "FAIL"  # 31 > 30
    assert status["tst-s6 mb 4: step time with / without --output-layer-loss-fusion"] == "info"
    tests = [row for row in summary["targets"] if row["target"].startswith("pytest")]
    # a failure; only a skip; no log at all
    assert [row["status"] for row in tests] == ["FAIL", "missing", "missing"]
    assert "failed: test_x" in tests[0]["measured"] and tests[2]["measured"] == "not measured"
    assert [s["status"] for s in summary["steps"]] == ["ok", "timed out"]
    assert not (tmp_path / "summary.md").read_text().startswith("**Dry run")
