"""CLI start-up: `dbdeck --version` against `python3 -c pass` and a bash script, in the same run.

Prints medians and ratios (absolute times are not comparable across machines or runs).
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 25


def median_seconds(argv):
    subprocess.run(argv, capture_output=True, check=True)  # warm the page cache
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as script:
        script.write('#!/bin/bash\ncase "$1" in --version) echo "sync-prod-to-dev.sh 1.0";; esac\n')
    Path(script.name).chmod(0o755)
    python = median_seconds([sys.executable, "-c", "pass"])
    bash = median_seconds([script.name, "--version"])
    version = median_seconds([str(ROOT / "bin" / "dbdeck"), "--version"])
    helptext = median_seconds([str(ROOT / "bin" / "dbdeck"), "--help"])
    print(f"python3 -c pass        {python * 1000:7.1f} ms  (baseline)")
    print(f"bash script --version  {bash * 1000:7.1f} ms")
    print(f"dbdeck --version       {version * 1000:7.1f} ms")
    print(f"dbdeck --help          {helptext * 1000:7.1f} ms")
    print(f"ratio dbdeck --version / python3 -c pass: {version / python:.2f}x")
    print(f"ratio dbdeck --help    / python3 -c pass: {helptext / python:.2f}x")
    print(f"ratio dbdeck --version / bash script:     {version / bash:.2f}x")
    Path(script.name).unlink()


if __name__ == "__main__":
    main()
