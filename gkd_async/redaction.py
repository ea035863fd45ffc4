"""Credentials kept out of what is shown: URLs (Redis, a served teacher's) with their passwords, tokens and
keys replaced by ***, for logs, error messages, config files and `config show`."""

from __future__ import annotations

import re

from pydantic import SecretStr

ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_QUERY_SECRET = re.compile(r"([?&](?:\w*password|pass|pwd|\w*token|\w*secret|api_key|key)=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with every password replaced by ***, fit for logs and error messages.

    Parsed by hand rather than with urllib: a password holding '#', '@' or '/' (not percent-encoded)
    cuts urllib's authority short, and the part left over would be shown. Everything before the last '@'
    counts as credentials, so an odd URL is redacted too much, never too little.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, host = rest[: rest.rfind("@")], rest[rest.rfind("@") + 1 :]
        user, colon, password = userinfo.partition(":")
        shown = password if ENV_REFERENCE.fullmatch(password) else "***"
        rest = f"{user}:{shown}@{host}" if colon else f"***@{host}"
    return _QUERY_SECRET.sub(r"\1***", f"{scheme}{sep}{rest}")


class SecretUrl(SecretStr):
    """A URL that shows its credentials nowhere: repr, str, f-strings, log lines and JSON dumps of a config
    read it as `redact_url` writes it; only `get_secret_value()` gives the URL itself, to connect with."""

    def _display(self) -> str:
        return redact_url(self.get_secret_value())
