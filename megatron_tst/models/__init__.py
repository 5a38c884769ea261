"""Model shapes and builders."""

from megatron_tst.models.gpt import (
    PRESETS,
    GPTArchitecture,
    build_gpt_model,
    default_transformer_impl,
    layer_spec,
    padded_vocab_size,
    preset,
    transformer_config,
    transformer_engine_available,
)

__all__ = [
    "PRESETS", "GPTArchitecture", "build_gpt_model", "default_transformer_impl", "layer_spec", "padded_vocab_size", "preset",
    "transformer_config", "transformer_engine_available",
]
