"""Mailroom's Airflow plugin: what Mailroom adds to Airflow itself.

Airflow imports every module of this folder by its file name, so this is the only module here;
the adapters it and the DAG use live in the installed package ``mailroom_airflow``.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class MailroomPlugin(AirflowPlugin):
    name = "mailroom"
