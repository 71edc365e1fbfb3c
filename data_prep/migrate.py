"""Move the metadata of a dataset converted before 2026-12 off the Arrow schema, so LanceDB's loaders open it.

Datasets converted earlier keep ``label_names`` and the conversion record (``lance_cookbook``) as schema-level
metadata, on which LanceDB 0.40.0's ``permutation_builder`` (and so a shuffled ``Permutation`` and
``StreamingDataset``) panics (docs/lance_loaders.md). :func:`migrate` moves them where
:func:`data_prep.convert.convert` writes them now: ``label_names`` on the ``label`` field, ``lance_cookbook``
on the ``image`` field. It is one metadata-only commit: no data file is rewritten, row positions stay the
same, and earlier versions still read as before (a run pinned to one keeps its old layout, which
:func:`lance_cookbook.label_names` still reads).

    python -m data_prep.migrate data/digits-train.lance data/digits-test.lance
"""

from __future__ import annotations

import argparse
import os
import sys

import lance

from lance_cookbook.recipe.dataset import _open as open_lance
from lance_cookbook.recipe.dataset import dataset_options

from .write import LABEL_NAMES_KEY, METADATA_KEY, RECORD_FIELD

__all__ = ["migrate", "main"]

# schema key -> the field that holds it now
_HOMES = {LABEL_NAMES_KEY: "label", METADATA_KEY: RECORD_FIELD}


def migrate(uri: str | os.PathLike, *, storage_options: dict[str, str] | None = None) -> int | None:
    """Move ``label_names`` and ``lance_cookbook`` off the schema metadata of the dataset at ``uri``.

    They move to the ``label`` and ``image`` fields, and every other schema-level key is dropped too
    (LanceDB panics on any), in one ``UpdateConfig`` commit. Returns the new version, or ``None`` when
    there was no schema metadata (nothing committed: running it twice is safe).

    Raises :class:`lance_cookbook.DatasetNotFound` when ``uri`` holds no dataset; ``ValueError`` when a key
    must move to a field the dataset does not have; a concurrent writer's commit makes Lance retry or raise.
    """
    ds = open_lance(uri, dataset_options(storage_options=storage_options))
    old = ds.schema.metadata or {}
    if not old:
        return None
    op = lance.LanceOperation
    fields: dict[int, dict[str, str]] = {}
    for key, name in _HOMES.items():
        if key in old:
            if name not in ds.schema.names:
                raise ValueError(
                    f"{os.fspath(uri)} has {key.decode()} metadata but no {name!r} column to move it to"
                )
            fields.setdefault(ds.lance_schema.field(name).id(), {})[key.decode()] = old[key].decode()
    update = op.UpdateConfig(
        schema_metadata_updates=op.UpdateMap({}, replace=True),
        field_metadata_updates={fid: op.UpdateMap(values, replace=False) for fid, values in fields.items()},
    )
    done = lance.LanceDataset.commit(ds.uri, update, read_version=ds.version, storage_options=storage_options)
    return done.version


def main(argv: list[str] | None = None) -> int:
    """The command line: migrate each URI in turn.

    Returns 0 when all are done, 2 at the first that fails (one line on stderr; the rest are not tried).
    """
    parser = argparse.ArgumentParser(prog="python -m data_prep.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("uris", nargs="+", metavar="URI", help="Lance datasets written by data_prep.convert")
    args = parser.parse_args(argv)
    for uri in args.uris:
        try:
            version = migrate(uri)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{uri}: " + (f"moved to field metadata (version {version})" if version else "nothing to move"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
