"""Helpers the chapters use to show things.

Image grids and plots (``viz``), commands run with their output streamed into the notebook (``commands``). Not
part of the recipe.
"""
