"""What an object-store failure means, in one line a user can act on."""

from __future__ import annotations

import re
import urllib.parse
import urllib.request

__all__ = ["store_error_reason", "silent_endpoint_reason", "endpoint_proxy", "ENDPOINT_REPLY_TIMEOUT_S"]

# What object stores answer (S3's error codes, inside the XML body Lance quotes), in words a user can act on.
# Codes: https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html#ErrorCodeList
_S3_CODES = {
    "NoSuchBucket": "bucket {bucket!r} does not exist (create it first)",
    "InvalidAccessKeyId": "access denied: the store does not know this access key id (aws_access_key_id)",
    "SignatureDoesNotMatch": "access denied: the secret access key does not match the access key id "
    "(aws_secret_access_key)",
    "AccessDenied": "access denied: these credentials may not use {bucket!r}",
    "ExpiredToken": "access denied: the session token has expired (aws_session_token)",
    "InvalidToken": "access denied: the session token is not valid (aws_session_token)",
    "PermanentRedirect": "bucket {bucket!r} is in another region: set aws_region to the bucket's region",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region: set aws_region to the "
    "bucket's region",
}


def store_error_reason(uri: str, error: BaseException) -> str | None:
    """Return the cause of a Lance object-store failure in one short phrase, or ``None`` if it is not one.

    Recognised in Lance's ``OSError``/``ValueError`` (lance#797): an S3 error code, an unsupported scheme
    (``s3a://``), ``http://`` without ``allow_http``, an endpoint that does not answer.
    """
    text = str(error)
    scheme = re.search(r"No object store provider found for scheme: '([^']+)'", text)
    if scheme:
        hint = " (Hadoop's name for S3): use s3://" if scheme.group(1) in ("s3a", "s3n") else ""
        return f"Lance cannot read or write {scheme.group(1)}:// URIs{hint}"
    code = re.search(r"<Code>([^<]+)</Code>", text)
    if code:
        bucket = re.search(r"<BucketName>([^<]+)</BucketName>", text)
        name = bucket.group(1) if bucket else uri.split("://", 1)[-1].split("/", 1)[0]
        message = re.search(r"<Message>([^<]+)</Message>", text)
        detail = f" ({message.group(1)})" if message else ""
        default = f"the store refused the request: {code.group(1)}{detail}"
        return _S3_CODES.get(code.group(1), default).format(bucket=name)
    if "HTTP error: builder error" in text and "http://" in text:
        return "the endpoint is http:// (no TLS): set the storage option allow_http=true to allow it"
    if "error sending request" in text or "Connection refused" in text:
        endpoint = re.search(r"GET (https?://[^/\s]+)", text)
        where = endpoint.group(1) if endpoint else "the store"
        return f"cannot reach {where} (is the endpoint right and the server up?)"
    return None


# Seconds an endpoint that accepted the connection may take to answer one request before it counts as silent;
# Lance's own client retries such a request for minutes (docs/scale.md).
ENDPOINT_REPLY_TIMEOUT_S = 10.0


def endpoint_proxy(endpoint: str, storage_options: dict[str, str] | None) -> str | None:
    """Return the proxy URL Lance's client uses for ``endpoint`` (``http(s)://host:port``), or ``None``.

    ``object_store``'s rules: ``proxy_url`` unless ``proxy_excludes``; else the ``*_PROXY`` variables.
    """
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.netloc.rsplit("@", 1)[-1]
    options = storage_options or {}
    if options.get("proxy_url"):
        excluded = urllib.request.proxy_bypass_environment(host, {"no": options.get("proxy_excludes", "")})
        return None if excluded else options["proxy_url"]
    proxies = urllib.request.getproxies_environment()  # {"http": ..., "https": ..., "all": ..., "no": ...}
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxy


def _shown(url: str) -> str:  # without the user name and password a proxy URL may carry
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


def silent_endpoint_reason(
    storage_options: dict[str, str] | None, timeout_s: float | None = None
) -> str | None:
    """Return why the store at ``aws_endpoint`` cannot be used when it sends no reply within ``timeout_s``.

    One ``HEAD /`` (default timeout :data:`ENDPOINT_REPLY_TIMEOUT_S`) through :func:`endpoint_proxy`'s proxy.
    ``None`` for any HTTP answer, a refused connection, no ``aws_endpoint``, or a proxy urllib cannot speak.
    """
    import urllib.error

    options = storage_options or {}
    endpoint = options.get("aws_endpoint", "")
    if not endpoint.startswith(("http://", "https://")):
        return None
    proxy = endpoint_proxy(endpoint, options)
    if proxy is not None and (not proxy.startswith("http://") or options.get("proxy_ca_certificate")):
        return None  # urllib speaks neither TLS to a proxy nor SOCKS: left to Lance
    timeout_s = ENDPOINT_REPLY_TIMEOUT_S if timeout_s is None else timeout_s
    scheme = urllib.parse.urlsplit(endpoint).scheme
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({scheme: proxy} if proxy else {}))
    try:
        opener.open(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # an answer
    except OSError as e:  # a timeout comes bare, or wrapped in a URLError
        if isinstance(getattr(e, "reason", e), TimeoutError):
            via = f" through the proxy {_shown(proxy)}" if proxy else ""
            within = f"within {timeout_s:g} s (is the server hung?)"
            return f"{endpoint} sent no reply to an HTTP request{via} {within}"
    return None
