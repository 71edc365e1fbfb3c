"""What an object-store failure means, in one line a user can act on: Lance's ``OSError`` translated
(:func:`store_error_reason`), and a silent endpoint caught before Lance's client retries it for minutes
(:func:`silent_endpoint_reason`)."""

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
    """The cause of an object-store failure from Lance, in one short phrase; ``None`` when ``error`` is not
    one (a local path, an ordinary "not found").

    Lance reports every store failure as ``OSError``/``ValueError`` with the server's XML reply or the HTTP
    client's bare words inside ("Generic S3 error ... HTTP error: builder error", lance#797). This finds
    the cause: an S3 error code (``NoSuchBucket`` -> ``bucket 'x' does not exist``), an unsupported URI
    scheme (``s3a://``), a plain-``http://`` endpoint without ``allow_http``, an endpoint that does not
    answer. Used by :func:`lance_cookbook.open_dataset` and the conversion, so reading and writing say the
    same thing.
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
        default = f"the store refused the request: {code.group(1)}" + (
            f" ({message.group(1)})" if message else ""
        )
        return _S3_CODES.get(code.group(1), default).format(bucket=name)
    if "HTTP error: builder error" in text and "http://" in text:
        return "the endpoint is http:// (no TLS): set the storage option allow_http=true to allow it"
    if "error sending request" in text or "Connection refused" in text:
        endpoint = re.search(r"GET (https?://[^/\s]+)", text)
        where = endpoint.group(1) if endpoint else "the store"
        return f"cannot reach {where} (is the endpoint right and the server up?)"
    return None


# How long an endpoint that accepted the connection may take to answer one request before we call it silent.
# Lance's own client retries such a request for minutes: measured against a local socket that accepts and
# never replies, lance.dataset("s3://...") had not returned after 400 s with default options, and took 245 s
# with timeout=10s (docs/scale.md).
ENDPOINT_REPLY_TIMEOUT_S = 10.0


def endpoint_proxy(endpoint: str, storage_options: dict[str, str] | None) -> str | None:
    """The proxy URL Lance's client sends requests for ``endpoint`` (``http(s)://host:port``) through, or
    ``None`` for a direct connection.

    The rules of Lance's client (the ``object_store`` crate over ``reqwest``): the storage option
    ``proxy_url`` for every request, except to hosts listed in ``proxy_excludes``; without it the
    environment, ``HTTPS_PROXY``/``HTTP_PROXY`` by the endpoint's scheme, else ``ALL_PROXY`` (either case,
    lower case first as ``urllib`` reads them), except to hosts listed in ``NO_PROXY``. Both lists are
    comma-separated host names, domain suffixes, IP addresses or ``*``.
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


def _shown(url: str) -> str:
    """``url`` without the user name and password a proxy URL may carry, for a message."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


def silent_endpoint_reason(
    storage_options: dict[str, str] | None, timeout_s: float | None = None
) -> str | None:
    """Why the store at ``storage_options["aws_endpoint"]`` cannot be used, when it sends no reply to one
    HTTP request within ``timeout_s`` (default :data:`ENDPOINT_REPLY_TIMEOUT_S`, 10 s): a server that
    accepts connections and hangs, or a host that drops them. ``None`` otherwise.

    One plain ``HEAD /`` over HTTP(S), sent the way Lance would send its own requests: through the proxy
    :func:`endpoint_proxy` finds (the ``proxy_url`` storage option, or ``HTTP(S)_PROXY``/``ALL_PROXY``
    minus ``NO_PROXY``), else directly. A store reachable only through a proxy must not be judged by the
    direct path, which a firewall may drop (AWSS3.jl#98, the t3-s3-proxy-endpoint-refused report). A proxy
    this check cannot speak to as Lance does (``https://`` or SOCKS, or ``proxy_ca_certificate`` set) skips
    the check: ``None``, nothing sent.

    Any HTTP answer, an error status included (a proxy's 502 too), means something is there (Lance then
    reports what it says); a refused or unresolvable connection is also left to Lance, which names it
    (:func:`store_error_reason`). Only the silence, a hang in Lance's client, is caught here. No
    ``aws_endpoint`` (AWS itself) or another scheme: ``None``, nothing sent.
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
