"""pgpass files (libpq's password file): the lines dbdeck writes and how it reads them back."""

import re


def pgpass_line(host, port, user, password):
    escape = lambda value: str(value).replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731
    return ":".join(escape(v) for v in (host, port, "*", user, password)) + "\n"


def password_in(text, user):
    """The password a pgpass text (as pgpass_line writes them) holds for user, or None."""
    unescape = lambda value: value.replace("\\:", ":").replace("\\\\", "\\")  # noqa: E731
    for line in (text or "").splitlines():
        fields = re.split(r"(?<!\\):", line, maxsplit=4)
        if len(fields) == 5 and unescape(fields[3]) in (user, "*"):
            return unescape(fields[4])
    return None


def pgpass_password(path, user):
    """The password the pgpass file at path holds for user, or None."""
    try:
        return password_in(path.read_text(), user)
    except OSError:
        return None
