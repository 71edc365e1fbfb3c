"""The recipe a reader copies: a Lance dataset of image bytes, samplers, a decoding collate, the loader.

Nothing here imports the rest of ``lance_cookbook`` or ``data_prep`` (``tests/test_recipe_imports.py``
checks it), so these files can be copied into a training codebase as they are. The public names are
exported by ``lance_cookbook`` itself (``lc.open_dataset``, ``lc.make_loader`` ...).
"""
