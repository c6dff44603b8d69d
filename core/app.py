"""`App`: what every command gets (options, config, runner, plugins) and the core's services to it:
endpoints, locks, events, results for `dbdeck status`, and printing a result in the chosen format."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Literal

from . import secrets
from .errors import DbdeckError

if TYPE_CHECKING:
    from .config import Config, EndpointConfig
    from .endpoints import Endpoint
    from .events import Event
    from .lock import JobLock
    from .run import Runner

log = logging.getLogger("dbdeck")


class App:
    """Per-invocation state shared by every command: options, config, runner, plugins."""

    def __init__(self) -> None:
        self.config_path: str | Literal[False] | None = None
        self.dry_run = False
        self.verbosity = 0
        self.format = "text"
        self._config: Config | None = None
        self._runner: Runner | None = None
        self._manager: Any = None
        # plugins whose "must not raise" hook raised during this command (pluginmanager.call_guarded)
        self.hook_failures: list[Any] = []

    @property
    def plugin_manager(self) -> Any:
        if self._manager is None:
            from .pluginmanager import shared_manager

            self._manager = shared_manager()
        return self._manager

    @property
    def config(self) -> Config:
        if self._config is None:
            from . import config as config_module

            sections: list[Any] = []
            for result in self.plugin_manager.hook.config_section():
                sections.extend(result if isinstance(result, (list, tuple)) else [result])
            self._config = config_module.load(self.config_path, sections)
        return self._config

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            from .run import Runner

            from . import output

            # with --format json stdout carries only the JSON document: dry-run lines are steps (stderr)
            self._runner = Runner(dry_run=self.dry_run,
                                  echo=lambda line: output.step(line) if self.format == "json" else output.line(line))
        return self._runner

    def endpoint(self, ref: str | dict | EndpointConfig, key: str = "endpoint") -> Endpoint:
        """An Endpoint from a name under `endpoints:` or an inline mapping in a plugin's section."""
        from .config import EndpointConfig, validate_model
        from .endpoints import Endpoint

        if isinstance(ref, str):
            return Endpoint(ref, self.config.endpoint_config(ref), self.runner)
        config: EndpointConfig = validate_model(EndpointConfig, ref, key.split(".")) if isinstance(ref, dict) else ref
        return Endpoint(key.rsplit(".", 1)[-1], config, self.runner)

    def lock(self, job_name: str) -> JobLock:
        """The job lock for job_name, under the configured run dir."""
        from .lock import JobLock

        return JobLock(job_name, self.config.core.run_dir)

    def notify(self, event: Event) -> None:
        if self.dry_run:
            self.runner.say(f"would notify: {event.kind}: {event.message}")
            return
        log.log(logging.WARNING if event.severity != "info" else logging.INFO, "%s: %s", event.kind, event.message)
        try:
            config = self.config
        except DbdeckError:
            config = None
        if config is not None:
            from . import history

            try:
                history.append(config, event)
            except OSError as exc:  # a full disk must not turn a done failover into a failed command
                log.warning("could not add the event to the history journal: %s", exc)
        # one plugin failing to deliver does not stop the others, nor turn the command's own outcome
        before = len(self.hook_failures)
        self.guarded_hook("notify", event=event, config=config)
        for failure in self.hook_failures[before:]:
            log.warning("%s (event %s not delivered there)", failure.message, event.kind)

    def guarded_hook(self, name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """[(plugin, answer), ...] of every plugin's `name` hook, called one by one so that one that raises
        costs only its own answer: its failure is logged at debug level and kept in self.hook_failures (each
        with .plugin and a one-line .message) for the command to show and to set its exit code."""
        from .pluginmanager import call_guarded

        answers, failures = call_guarded(self.plugin_manager, name, **kwargs)
        self.hook_failures.extend(failures)
        return answers

    def record_result(self, name: str, kind: str, ok: bool, summary: str, seconds: float | None = None,
                      **details: Any) -> None:
        """Remember how this command's work ended, for `dbdeck status` (nothing in a dry run)."""
        if self.dry_run:
            return
        from .status import record_result

        try:
            record_result(self.config, name, kind, ok, summary, seconds, **details)
        except OSError as exc:
            log.warning("could not record the result for dbdeck status: %s", exc)

    def announce(self, service: str, **details: Any) -> None:
        """A service's one result, written as it starts serving: with --format json the document saying what
        it serves (its pid to stop it with); in text mode a line on stderr (stdout stays free)."""
        import os

        from . import output

        if self.format == "json":
            self.emit({"service": service, "pid": os.getpid(), **details})
        else:
            shown = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in details.items())
            output.line(secrets.mask(f"{service}: {shown}"), err=True)

    def emit(self, data: Any, text: str | Callable[[], str] | None = None) -> None:
        """Print a result: JSON with --format json, otherwise text (a string or a callable)."""
        from . import output

        if self.format == "json":
            # masked value by value: masking the JSON text could swallow a closing quote
            output.document(json.dumps(secrets.mask_values(data), indent=2, default=str, sort_keys=False))
        else:
            output.line(secrets.mask(text() if callable(text) else (text if text is not None else str(data))))
