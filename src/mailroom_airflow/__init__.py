"""Airflow adapters for Mailroom: connections, variables, the approval gate's setup."""
