"""What the tests share, in one place (importable as ``helpers``: pytest.ini puts tests/ on the path).

- :mod:`helpers.tiny`: the tiny model and run options the tests build on;
- :mod:`helpers.kit`: data fixtures in the real on-disk formats (Fashion-MNIST IDX, CIFAR-10 batches, ImageNet
  folders), running a tool in-process or in a subprocess, reading its logs, and the pytest fixtures ``kit``,
  ``restore_process_state`` and ``skip_cifar_md5`` (registered by the conftest files that import them);
- :mod:`helpers.cityscapes`: a tiny Cityscapes tree in the real layout;
- :mod:`helpers.rel`: running a tool through ``tests/reliability/rel_hooks.py`` with a fault on cue, killing it,
  fingerprints of folders.
"""
