"""megatron_tst: Token Superposition Training (arXiv 2605.06546) on megatron-core."""

from megatron_tst.platform import install as _install_platform
from megatron_tst.platform import quiet_fallback_warnings as _quiet_fallback_warnings

__version__ = "0.1.0"

# Before anything imports megatron.core: on a machine without CUDA this prepares torch so that the
# real megatron-core runs on CPU over gloo (a no-op when CUDA is available).
_install_platform()
_quiet_fallback_warnings()  # before megatron-core's first import: one note instead of six warnings per rank
