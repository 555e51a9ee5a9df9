"""An example reidzoo plugin: one dataset, read from a folder per identity.

Importing the package registers ``ExampleFolderReID`` in fast-reid's ``DATASET_REGISTRY`` and
adds the config node ``DATASETS.EXAMPLE_FOLDER``; reidzoo imports it through the
``reidzoo.plugins`` entry point declared in ``pyproject.toml``.
"""

from .dataset import ExampleFolderReID, add_example_folder_config

__all__ = ["ExampleFolderReID", "add_example_folder_config"]
