"""Schedule plugin: `dbdeck schedule install|status|remove|run|exec` and the seed's `setup-sync-cron`."""

from dbdeck.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import schedule_group, setup_sync_cron

    cli.add_command(schedule_group)
    cli.add_command(setup_sync_cron)


@hookimpl
def config_section():
    from dbdeck.config import ConfigSection

    return [
        ConfigSection("scheduler", "dbdeck.plugins.schedule.model:SchedulerSettings",
                      env={"SYNC_CRON_INTERVAL": "sync_cron_interval"},
                      description="how scheduled jobs are installed (cron or systemd) and where run state is kept"),
        ConfigSection("schedules", "dbdeck.plugins.schedule.model:Schedules",
                      description="job name -> command and timing"),
    ]


@hookimpl
def status_report(app):
    from .commands import _backend
    from .jobs import all_jobs
    from .report import job_items, worth_showing

    try:
        jobs = all_jobs(app)
    except Exception as exc:  # noqa: BLE001 - the status view must show the problem, not die of it
        from dbdeck.status import Item

        return [Item(kind="job", name="(schedules)", state="failing", detail=str(exc).splitlines()[0])]
    return job_items(app, worth_showing(app, jobs), _backend(app, None)) + _hook_failure_items(app)


def _hook_failure_items(app):
    from dbdeck.status import Item

    failed = {failure.message: failure.plugin for failure in app.hook_failures if failure.hook == "scheduled_jobs"}
    return [Item(kind="plugin", name=plugin, state="failing", detail=message) for message, plugin in failed.items()]
