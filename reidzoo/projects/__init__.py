"""Paper packages: ``reidzoo.projects.<pkg>`` is installed from ``projects/<Paper>/<pkg>/``.

Each paper package is listed in the ``reidzoo.plugins`` entry-point group that ``setup.py``
writes for it, exactly like a third-party plugin, and is imported only when a config asks for
it (``REIDZOO.CUSTOM_IMPORTS``, which every paper config sets, or a name only it provides:
:mod:`reidzoo.plugins`).
"""
