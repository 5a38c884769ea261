"""megatron_tst: Token Superposition Training (arXiv 2605.06546) on megatron-core."""

from megatron_tst.platform import install as _install_platform

__version__ = "0.1.0"

# Before anything imports megatron.core: on a machine without CUDA this prepares torch so that the
# real megatron-core runs on CPU over gloo (a no-op when CUDA is available).
_install_platform()
