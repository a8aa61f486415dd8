"""URLs as they may appear in logs, errors and the lake: never with userinfo (`user:password@`)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def public_url(url: str) -> str:
    """`url` without userinfo (`http://user:pw@host:9000/x` -> `http://host:9000/x`)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
