"""Start methods: fork refused, a fork server that preloads torch and never Lance."""

from __future__ import annotations

import multiprocessing

import pytest

from lance_cookbook import make_loader


def test_fork_is_refused_with_the_reason(id_dataset):
    for ctx in ("fork", multiprocessing.get_context("fork")):
        with pytest.raises(ValueError, match="fork.*not safe with Lance.*spawn"):
            make_loader(id_dataset, num_workers=1, multiprocessing_context=ctx)
    forkserver = make_loader(id_dataset, num_workers=1, multiprocessing_context="forkserver")
    assert forkserver.multiprocessing_context.get_start_method() == "forkserver"


def test_the_fork_server_preloads_torch_and_never_lance():
    """Workers fork from a server that imported torch once (fast start); Lance must be imported only after
    the fork (lance#3727), and a script's __main__ may import it, so neither is preloaded."""
    import multiprocessing.forkserver

    from lance_cookbook.recipe.start_method import lance_safe_context

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform has no forkserver: spawn is used")
    multiprocessing.set_forkserver_preload(["__main__", "lance", "json"])
    lance_safe_context(["torch", "numpy"])
    preload = multiprocessing.forkserver._forkserver._preload_modules
    assert preload == ["json", "torch", "numpy"]
