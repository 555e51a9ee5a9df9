"""Paper packages: ``reidzoo.projects.<pkg>`` is installed from ``projects/<Paper>/<pkg>/``.

Each paper package registers itself through the ``reidzoo.plugins`` entry-point group that
``setup.py`` writes for it, so :func:`reidzoo.plugins.load_plugins` imports every installed
paper exactly like a third-party plugin.
"""
