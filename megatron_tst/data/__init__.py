"""Data: TST datasets over Megatron's indexed (.bin/.idx) format."""

from megatron_tst.data.tst_datasets import NEXT_TOKEN, DataConfig, DataTooSmallError, TSTData

__all__ = ["NEXT_TOKEN", "DataConfig", "DataTooSmallError", "TSTData"]
