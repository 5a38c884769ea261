"""FP8=... in the launch recipes: NVIDIA's documented settings per GPU (H100: delayed or tensorwise
scaling, --fp8-format hybrid; B200: MXFP8), each flag set valid for the parser and refused here, on
a machine without Transformer Engine, with that reason; the combinations megatron-core would ignore
or Megatron-LM refuses are one-line errors."""

import dataclasses
import os
import shlex
import subprocess

import pytest

from megatron_tst.arguments import check_environment, model_settings, parse_args
from megatron_tst.launch import launcher_parser
from megatron_tst.models.gpt import transformer_engine_available

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
REQUIRED = {"DATA_PATH": "/data/corpus_text_document", "TOKENIZER_MODEL": "/data/tok", "CHECKPOINT_DIR": "/ckpt"}
# FP8 value -> (--fp8-format, --fp8-recipe, TransformerConfig's amax settings, FP8 parameters)
EXPECTED = {
    "delayed": ("hybrid", "delayed", {"fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}, True),
    "tensorwise": ("hybrid", "tensorwise", {}, False),
    "mxfp8": ("e4m3", "mxfp8", {}, False),
}


def resolved(script, **env):
    result = subprocess.run(["bash", os.path.join(EXAMPLES, script)], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **REQUIRED, "DRY_RUN": "1", **env}, timeout=60)
    return result, (shlex.split(result.stdout.splitlines()[1])[3:] if result.returncode == 0 else None)


@pytest.mark.parametrize("script", ["pretrain_tst_dense.sh", "pretrain_tst_moe_10b_a1b.sh"])
def test_each_recipe_fp8_setting_parses_and_is_refused_here_without_transformer_engine(script):
    _, bf16 = resolved(script)
    assert not any(arg.startswith("--fp8") for arg in bf16)  # unset: bf16, as before
    for fp8, (fp8_format, recipe, amax, fp8_params) in EXPECTED.items():
        for baseline in ("0", "1"):  # the matched baseline trains in the same precision
            _, argv = resolved(script, FP8=fp8, BASELINE=baseline)
            _, rest = launcher_parser().parse_known_args(argv)
            config = parse_args(rest)  # every setting valid together
            model = config.model
            assert (model.fp8_format, model.fp8_recipe, model.fp8_param_gather) == (fp8_format, recipe, fp8_params)
            settings = model_settings(config)
            assert {k: settings[k] for k in settings if k.startswith("fp8_amax")} == amax
            plain = parse_args(launcher_parser().parse_known_args(resolved(script, BASELINE=baseline)[1])[1])
            fp8_fields = ("fp8_format", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo",
                          "fp8_param_gather")
            assert dataclasses.replace(model, **{f: getattr(plain.model, f) for f in fp8_fields}) == plain.model
            assert dataclasses.replace(config, model=plain.model) == plain  # nothing else changes
            if not transformer_engine_available():
                with pytest.raises(ValueError, match="^--fp8-format needs Transformer Engine, which is not installed"):
                    check_environment(config)
    result, _ = resolved(script, FP8="fp8")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: FP8 must be delayed or tensorwise (H100), mxfp8 (B200)")


TINY = ["--model-preset", "tiny", "--seq-length", "32", "--use-distributed-optimizer"]


@pytest.mark.parametrize("flags, message", [
    (["--fp8-recipe", "mxfp8"], "--fp8-recipe needs --fp8-format"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "1024"],
     "--fp8-amax-history-len is delayed scaling's amax history; --fp8-recipe tensorwise"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8", "--fp8-amax-compute-algo", "max"],
     "--fp8-amax-compute-algo is delayed scaling's amax history; --fp8-recipe mxfp8"),
    (["--fp8-format", "e5m2"], "--fp8-format e5m2 is not one of e4m3, hybrid"),  # TE: no pure E5M2 training
])
def test_fp8_combinations_megatron_core_would_ignore_or_refuse_are_one_line_errors(flags, message):
    with pytest.raises(ValueError) as error:
        parse_args(TINY + flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="^--fp8-param-gather needs --use-distributed-optimizer"):
        parse_args(TINY[:-1] + ["--fp8-format", "hybrid", "--fp8-param-gather"])
    assert parse_args(TINY + ["--fp8-format", "hybrid", "--fp8-amax-history-len", "16"]).model.fp8_recipe is None
