"""A Redis URL as the store takes it: checked (:func:`check_url_query`: the query and the
database path, at construction) and shown (:func:`redact_url`: never a password or a
value that may be a secret). Pure, no redis import.

redis-py lets a URL's query win over the keyword arguments the store passes it: a query
may not set what the store's own options check (``URL_OWNED_PARAMETERS``), and one
redis-py could not use is refused here, not failed at every batch as a fault.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

from kvtier.reprs import shown

URL_SCHEMES = ("redis", "rediss", "unix")
# Query parameters of a URL that redis-py would let override an option the store checks
# (its query wins over keyword arguments), and the option to set instead.
URL_OWNED_PARAMETERS = {
    "socket_timeout": "timeout_s", "socket_connect_timeout": "timeout_s",
    "timeout": "timeout_s", "retry_on_timeout": "max_retries", "retry_on_error": "max_retries",
    "socket_read_size": "nothing (kvtier sets the read size)",
    "max_connections": "num_connections", "ssl_ca_certs": "ca_file",
}
# The query parameters passed on to redis-py, and whether each must be an integer >= 0.
URL_PARAMETERS = {"db": True, "health_check_interval": True, "password": False,
                  "username": False, "client_name": False, "socket_keepalive": False}
# Those passed on with rediss:// only (a plain connection takes none of them).
URL_TLS_PARAMETERS = ("ssl_check_hostname", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")
# The query parameters whose values a message may show (none is a secret).
_SHOWN_PARAMETERS = frozenset({*URL_PARAMETERS, *URL_TLS_PARAMETERS, *URL_OWNED_PARAMETERS}
                              - {"password"})


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: in its user info and in a
    ``password`` query parameter (redis-py takes both), and the value of every query
    parameter not known to hold no secret. Never raises. Pure.

    NOTE: the text is edited, not rebuilt from ``urlsplit``'s fields: its ``port`` raised
    ValueError for a port out of range (a status 70 in place of the error being reported),
    and ``hostname`` dropped an IPv6 address's brackets; a query's password was shown."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" in the host: nothing of it is shown
        return "<a URL that does not parse>"
    netloc = parts.netloc
    user_info, at, host = netloc.rpartition("@")
    if at and ":" in user_info:
        netloc = f"{user_info.split(':', 1)[0]}:***@{host}"
    # NOTE: only the values of parameters known to hold no secret are shown: an unknown
    # one (``?passwd=...``, a misspelt ``?pasword=...``) was shown whole in the refusal
    # that named it.
    query = "&".join(
        f"{name}{sep}{value}" if not sep or unquote(name).lower() in _SHOWN_PARAMETERS
        else f"{name}=***"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    ) if parts.query else ""
    # Spliced into the text (urlunsplit drops the "//" of "unix:///path").
    redacted = url.replace(parts.netloc, netloc, 1) if netloc != parts.netloc else url
    return redacted.replace("?" + parts.query, "?" + query, 1) if query != parts.query else (
        redacted)


def check_url_query(url: str, cluster: bool = False) -> None:
    """ValueError naming the parameter (never a password) where the query or the database
    path of ``url`` would not give the store it describes; else None. Pure.

    NOTE: redis-py lets a query parameter win over the options the store checks:
    ``?socket_timeout=3`` held a read of a paused server 3.9 s past ``max_blocking_s``
    (0.41 s), and a parameter it cannot use (``?db=x``, ``?foo=bar``, ``?socket_timeout=nan``)
    failed every batch for ever, as a fault, in place of this error at construction."""
    parts = urlsplit(url)
    # NOTE: a port that is none (99999, abc, -1) made a store whose every batch failed for
    # ever, as a fault ("ValueError: Port out of range"), and port 0 one that redis-py
    # pointed at 6379, another server than the url names, without a word.
    if parts.scheme == "unix":
        if not unquote(parts.path):
            raise ValueError(f"a unix:// url needs the socket's path, got "
                             f"{shown(redact_url(url))}")
    else:
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0 or (port is None and parts.netloc.rpartition("@")[2].endswith(":")):
            raise ValueError(f"url port must be an integer in 1..65535, got "
                             f"{shown(redact_url(url))}")
    databases: list[str] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "db":
            databases.append(value)
        if name in URL_OWNED_PARAMETERS:
            raise ValueError(f"url parameter {shown(name)} would override what the store checks: "
                             f"set {URL_OWNED_PARAMETERS[name]}, got {shown(redact_url(url))}")
        if name in URL_TLS_PARAMETERS:
            if parts.scheme != "rediss":
                raise ValueError(f"url parameter {shown(name)} is for TLS: the url must start with "
                                 f"rediss://, got {shown(redact_url(url))}")
            continue
        if name not in URL_PARAMETERS:
            raise ValueError(f"url parameter {shown(name[:40])} is not one the store passes to "
                             f"redis (it takes {', '.join(URL_PARAMETERS)}, and "
                             f"{', '.join(URL_TLS_PARAMETERS)} with rediss://), got "
                             f"{shown(redact_url(url))}")
        if URL_PARAMETERS[name] and not (value.isascii() and value.isdigit()):
            raise ValueError(f"url parameter {shown(name)} must be an integer >= 0, got "
                             f"{shown(value[:40])}")
    db = unquote(parts.path).replace("/", "")
    if parts.scheme != "unix" and db and not (db.isascii() and db.isdigit()):
        # NOTE: redis-py ignores a path that is no number: the store used database 0.
        raise ValueError(f"url path must be a database number, got {shown(parts.path[:40])}")
    # NOTE: redis-py takes the query's db before the path's. A cluster has database 0 only:
    # another failed every batch with a RedisClusterException, as a fault.
    database = databases[0] if databases else db if parts.scheme != "unix" else ""
    if cluster and database and int(database) != 0:
        raise ValueError(f"a Redis Cluster has database 0 only, the url names database "
                         f"{int(database)}: {shown(redact_url(url))}")
