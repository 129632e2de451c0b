from support.airflow_env import configure_airflow_home

configure_airflow_home()
