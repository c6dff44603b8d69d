"""Masking of secrets in anything that may be printed: logs, errors, command lines.

Known secret values are registered once (passwords read from config or generated) and replaced
wherever they appear; on top of that, URL passwords and key=value passwords are masked by shape,
so a DSN typed straight into a config file is safe to print even before it was registered.
"""

import functools
import re
import threading

MASK = "***"
_MIN_SECRET_LENGTH = 3

_lock = threading.Lock()
_known: set[str] = set()

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?=@)")
_KEY_VALUE_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|pgpassword|mysql_pwd|secret|token)\s*[=:]\s*)"
    # MySQL's "Access denied ... (using password: YES)" says whether one was sent, not what it was
    r"(?!(?:YES|NO)\))"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&]+)",
    re.IGNORECASE,
)


_SECRET_NAME = re.compile(r"PASS|PWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY", re.IGNORECASE)


def is_secret_name(name):
    """Whether a variable or key name (PGPASSWORD, MYSQL_PWD, API_TOKEN...) holds a secret."""
    return bool(_SECRET_NAME.search(name))


def register(secret):
    """Remember a secret value so that mask() hides it wherever it appears later."""
    if secret is None:
        return
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
    if len(value) >= _MIN_SECRET_LENGTH:
        with _lock:
            _known.add(value)


@functools.lru_cache(maxsize=256)
def _occurrences(value):
    """Where a known secret is replaced. A plain word (a weak password such as 'postgres') only as a
    whole word: masked inside 'postgresql' it would garble messages and give itself away (***ql://).
    Anything else wherever it appears."""
    pattern = re.escape(value)
    if value.isalpha():
        pattern = rf"(?<![A-Za-z0-9_]){pattern}(?![A-Za-z0-9_])"
    return re.compile(pattern)


def mask(text):
    """Return text with every registered secret and every password-shaped value replaced by ***."""
    if text is None:
        return text
    if not isinstance(text, str):
        text = str(text)
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = _occurrences(value).sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    # a value already masked above keeps what follows it: "(PGPASSWORD=***)" stays whole
    text = _KEY_VALUE_PASSWORD.sub(
        lambda m: m.group(0) if m.group("secret").startswith(MASK) else m.group("head") + MASK, text)
    return text


def mask_values(data):
    """mask() applied to every string inside nested dicts, lists and tuples (keys included)."""
    if isinstance(data, str):
        return mask(data)
    if isinstance(data, dict):
        return {mask_values(key): mask_values(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [mask_values(value) for value in data]
    return data
