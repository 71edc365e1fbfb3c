"""Conversion of image datasets into Lance (`python -m data_prep.convert`), beside the recipe package.

Modules, lowest first: ``check`` (one image's check), ``sources`` (records to convert), ``pool`` (checking
them in parallel), ``write`` (data files and the atomic commit), ``ray_engine`` (the same on a Ray cluster),
``convert`` (``convert()`` and the command line), ``migrate`` (older datasets' metadata moved where LanceDB's
loaders read it). Each imports only those before it.
"""
