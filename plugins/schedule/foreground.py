"""`dbdeck schedule run`: a foreground scheduler for hosts without cron or systemd (the seed-001 platform).

Each due job runs as `dbdeck schedule exec <job>` in its own process and session, so a failing or
hanging job cannot take the scheduler down and a terminal's Ctrl-C reaches only the scheduler. A job
is never started while its previous run is still going. On SIGTERM/SIGINT the scheduler stops
starting jobs, waits for the running ones to finish and exits; a second signal stops them too.
"""

import logging
import signal
import time

import schedule

from dbdeck.errors import EXIT_LOCKED, UsageError

from .jobs import dbdeck_argv

log = logging.getLogger("dbdeck.schedule")
_POLL_SECONDS = 0.05


class ForegroundScheduler:
    def __init__(self, app, jobs):
        self.app = app
        self.jobs = jobs
        self.scheduler = schedule.Scheduler()
        self.running = {}
        self.stopping = False
        self.signals = 0
        self.received = []
        self.finished = []

    def plan(self):
        for name, job in self.jobs.items():
            if not job.enabled:
                continue
            if job.every is not None:
                self.scheduler.every(job.every_seconds).seconds.do(self.launch, name)
            elif job.cron is not None:
                self.scheduler.every().minute.at(":00").do(self.launch_if_cron_matches, name, job.cron)
            else:
                raise UsageError(f"job {name}: on_calendar needs the systemd backend; give it `every:` or "
                                   f"`cron:` to run it with `dbdeck schedule run`")

    def launch_if_cron_matches(self, name, expression):
        from datetime import datetime

        from croniter import croniter

        if croniter.match(expression, datetime.now().replace(second=0, microsecond=0)):
            self.launch(name)

    def launch(self, name):
        if self.stopping:
            return
        if name in self.running:
            process, started = self.running[name]
            log.warning("job %s: previous run (pid %s) still going after %.1fs; skipping this run",
                        name, process.pid, time.monotonic() - started)
            return
        process = self.app.runner.start_daemon(dbdeck_argv(self.app, "schedule", "exec", name))
        self.running[name] = (process, time.monotonic())
        log.info("job %s: started (pid %s)", name, process.pid)

    def reap(self):
        for name, (process, started) in list(self.running.items()):
            status = process.poll()
            if status is None:
                continue
            duration = time.monotonic() - started
            del self.running[name]
            self.finished.append((name, status, duration))
            if status == 0:
                log.info("job %s: exit 0 in %.2fs", name, duration)
            elif status == EXIT_LOCKED:
                log.warning("job %s: skipped, another run holds its lock (%.2fs)", name, duration)
            else:
                log.error("job %s: FAILED with exit %s in %.2fs", name, status, duration)

    def _on_signal(self, signum, frame):
        # Only note the signal: acting on it here could interleave with a launch in progress (a
        # "started" line after "no new runs"); the loop acts on it between launches.
        self.stopping = True
        self.received.append(signum)

    def act_on_signals(self):
        while self.received:
            signum = self.received.pop(0)
            self.signals += 1
            if self.signals == 1:
                log.warning("received %s: no new runs; waiting for %d running job(s) to finish (signal again "
                            "to stop them)", signal.Signals(signum).name, len(self.running))
            else:
                for name, (process, _) in self.running.items():
                    log.warning("job %s: stopping pid %s", name, process.pid)
                    process.send_signal(signal.SIGTERM)

    def run(self, run_now=False, max_seconds=None, ready=None):
        self.plan()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if ready is not None:  # from here on a SIGTERM is a clean stop
            ready()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        log.info("scheduler: %d job(s): %s", len(self.scheduler.get_jobs()),
                 ", ".join(f"{n} ({j.timing()})" for n, j in self.jobs.items() if j.enabled))
        try:
            if run_now:
                self.scheduler.run_all()
            while not self.stopping:
                self.scheduler.run_pending()
                self.reap()
                self.act_on_signals()
                if deadline and time.monotonic() >= deadline:
                    self.stopping = True
                    break
                idle = self.scheduler.idle_seconds
                time.sleep(max(0.0, min(_POLL_SECONDS, idle if idle is not None else _POLL_SECONDS)))
            self.act_on_signals()
            while self.running:
                self.reap()
                self.act_on_signals()
                time.sleep(_POLL_SECONDS)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("scheduler: stopped")
        return self.finished
