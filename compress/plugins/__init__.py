"""Built-in pruning plugins of compress.

They are registered through the ``compress.plugins`` entry-point group in ``setup.cfg``, exactly as a
third-party package registers its own: importing this package registers nothing by itself.
"""
