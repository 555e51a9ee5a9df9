"""Visualisation tools: retrieval rank lists and per-paper explanatory maps over the input.

* :mod:`reidzoo.visualize.common`: shared image helpers (cells with borders and captions,
  grids, titles, atomic PNG writing);
* :mod:`reidzoo.visualize.ranks`: rank-list figures per query and the CMC curve
  (``python -m reidzoo.visualize ranks``);
* :mod:`reidzoo.visualize.maps`, :mod:`reidzoo.visualize.overlay`: explanatory maps
  (``python -m reidzoo.visualize maps``).

Nothing is imported here, so that importing one tool does not load the others' dependencies.
"""
