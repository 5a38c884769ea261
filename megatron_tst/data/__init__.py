"""Data: TST datasets over Megatron's indexed (.bin/.idx) format, and tokenizers.

Imported lazily: the tokenizers (used by tools/preprocess_data.py) must not pay for importing
megatron-core's dataset machinery.
"""

_DATASET_NAMES = ("NEXT_TOKEN", "DataConfig", "DataTooSmallError", "TSTData")
__all__ = list(_DATASET_NAMES)


def __getattr__(name):
    if name in _DATASET_NAMES:
        from megatron_tst.data import tst_datasets

        return getattr(tst_datasets, name)
    raise AttributeError(f"module 'megatron_tst.data' has no attribute {name!r}")
