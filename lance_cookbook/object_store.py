"""Object storage for Lance: the storage options it needs.

Lance reads and writes ``s3://bucket/path.lance`` itself (no boto3 at run time); everything it needs is in
``storage_options``, a ``dict[str, str]`` passed to ``lance.dataset``/``write_fragments``/``commit`` and, via
``SafeLanceDataset(dataset_options={"storage_options": ...})``, to every DataLoader worker.
"""

from __future__ import annotations

__all__ = ["s3_storage_options"]


def s3_storage_options(
    endpoint: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str = "us-east-1",
    session_token: str | None = None,
) -> dict[str, str]:
    """Lance ``storage_options`` for Amazon S3 or an S3-compatible store (MinIO, Ceph, R2, moto ...).

    ``endpoint``: ``None`` for AWS itself, else the server's URL (``http://host:port``); a plain-HTTP endpoint
    also sets ``allow_http``. ``key``/``secret``: leave ``None`` to let Lance find credentials the usual AWS
    way (environment, profile, instance role), which is what a real cluster should do.
    """
    options = {"aws_region": region}
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    if key is not None:
        options["aws_access_key_id"] = key
    if secret is not None:
        options["aws_secret_access_key"] = secret
    if session_token is not None:
        options["aws_session_token"] = session_token
    return options
