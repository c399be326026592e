"""Fixtures of the tool tests: ``kit`` (the helpers of :mod:`helpers.kit`), one thread per test with the process
state put back afterwards, and the CIFAR-10 checksum bypass."""
from helpers.kit import kit, restore_process_state, skip_cifar_md5  # noqa: F401  (registered as fixtures)
