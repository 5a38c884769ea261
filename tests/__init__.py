import megatron_tst  # noqa: F401  (before megatron.core, also in spawned worker processes)
