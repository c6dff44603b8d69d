"""dbdeck never runs code from the directory it is started in (issue 29.7).

`python -m` puts the working directory first on sys.path, so a `dbdeck/` package there would run
instead of dbdeck, as whoever started it (root, for the installed jobs). Every way dbdeck is started
(bin/*, the jobs cron/systemd/the scheduler run, the daemonised monitor) must ignore it.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hostile_directory(tmp_path):
    """A directory with a `dbdeck` package that leaves a mark when imported, as a local user could make."""
    planted = tmp_path / "dbdeck"
    planted.mkdir()
    mark = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    (planted / "launch.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    return tmp_path, mark


def test_every_bin_script_ignores_a_dbdeck_package_in_the_working_directory(tmp_path):
    cwd, mark = hostile_directory(tmp_path)
    scripts = sorted(p for p in (ROOT / "bin").iterdir() if p.is_file())
    assert len(scripts) >= 15
    for script in scripts:
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=cwd, timeout=60)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"
        assert "Usage:" in done.stdout, script.name
        assert not mark.exists(), f"{script.name} ran the dbdeck package of its working directory"


def test_the_command_line_dbdeck_starts_itself_with_ignores_it_too(tmp_path):
    """What installed jobs and the daemonised monitor run (schedule.jobs, auto-failover --daemon)."""
    from dbdeck.run import dbdeck_argv

    cwd, mark = hostile_directory(tmp_path)
    command = dbdeck_argv("dbdeck", "--version")
    assert command[0] == sys.executable
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("dbdeck "), done.stderr
    assert not mark.exists()
    # the same command without the guard does run it: the test can see the fault it guards against
    unguarded = [part for part in command if part != "-P"]
    subprocess.run(unguarded, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert mark.exists()


def test_jobs_and_the_monitor_use_the_guarded_command_line():
    sources = {path: path.read_text() for path in (ROOT / "plugins").rglob("*.py")}
    sources.update({path: path.read_text() for path in (ROOT / "core").rglob("*.py")})
    unguarded = [str(path.relative_to(ROOT)) for path, text in sources.items()
                 if '"-m", "dbdeck.launch"' in text and path != ROOT / "core" / "run.py"]
    assert unguarded == [], "start dbdeck through dbdeck.run.dbdeck_argv(), which adds -P"
