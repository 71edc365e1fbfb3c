"""The recipe a reader copies as is: it imports nothing else of the project (tests/test_recipe_imports.py).

Its public names are exported by ``lance_cookbook`` itself (``lc.open_dataset``, ``lc.make_loader`` ...).
"""
