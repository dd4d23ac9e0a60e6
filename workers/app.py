"""The Celery application. Light to import: the API sends tasks through it."""

from celery import Celery

app = Celery("h2k")
app.config_from_object("celeryconfig")
# Loaded by workers only; the API sends tasks by name.
app.conf.include = ["workers.tasks", "workers.signals", "workers.startup"]

RUN_JOB = "h2k.run_job"
RUN_JOB_ONCE = "h2k.run_job_once"
