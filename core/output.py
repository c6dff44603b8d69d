"""Writing lines for people and programs without letting a closed reader stop the work.

`dbdeck ... | head -1` closes stdout after one line. A command that is halfway through a copy must
still finish or clean up (drop its staging database, release its lock), so the writes here never
raise: once a stream is gone, later lines to it are dropped and the work goes on. Logs still get
every line.
"""

import os
import sys

_closed = set()


def line(text, err=False):
    """Write text and a newline to stdout (stderr with err=True); never raises."""
    stream = sys.stderr if err else sys.stdout
    name = "stderr" if err else "stdout"
    if name in _closed:
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError):
        _closed.add(name)
        detach(stream)
    except OSError:
        _closed.add(name)


def detach(stream=None):
    """Point a closed stream's descriptor at /dev/null so buffered bytes and the exit flush do not
    fail again (Python would print 'Exception ignored ... BrokenPipeError')."""
    stream = stream or sys.stdout
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
