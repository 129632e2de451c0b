# Mailroom on Apache Airflow: the official image plus the pinned lock, the packages (the domain
# package, its Airflow adapters and the dev server), the DAG, the Airflow plugin (plugins/) and
# the campaigns, templates and catalogs (include/).
# Build: docker compose build   (or: docker build -t mailroom-airflow:local .)
#
# The base image's Airflow and Python versions must match the lock: apache-airflow==3.3.2 in
# requirements.txt, Python 3.11 (tests/dag/test_compose.py checks both).
FROM apache/airflow:3.3.2-python3.11

# The official image runs as the unprivileged user "airflow" (uid 50000, gid 0) and installs
# Python packages for that user. As root only to create the folders it will own: the package's
# build folder, and the mount points of the named volumes compose creates (a new volume takes the
# owner of the folder it is mounted on): the shared staging area, the simple auth manager's
# passwords, the dev server's records.
USER root
RUN mkdir -p /opt/mailroom /opt/airflow/staging /opt/airflow/auth /opt/airflow/sendgrid-dev \
    && chown -R airflow:0 /opt/mailroom /opt/airflow/staging /opt/airflow/auth /opt/airflow/sendgrid-dev
USER airflow

# 1. The lock first, so the layer is cached until requirements.txt changes. It pins
#    apache-airflow==3.3.2 itself, so installing it cannot move Airflow to another version.
COPY --chown=airflow:0 requirements.txt /opt/mailroom/requirements.txt
RUN pip install --no-cache-dir -r /opt/mailroom/requirements.txt

# 2. The packages (src/: mailroom, mailroom_airflow, sendgrid_dev), without dependencies: the
#    lock already installed them.
COPY --chown=airflow:0 pyproject.toml README.md /opt/mailroom/
COPY --chown=airflow:0 src/ /opt/mailroom/src/
RUN pip install --no-cache-dir --no-deps /opt/mailroom

# 3. What Airflow loads: the DAG, the plugin, and what the tasks read at run time.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/

# Read by src/mailroom_airflow/settings.py and dags/mailroom_campaign.py.
ENV MAILROOM_INCLUDE_DIR=/opt/airflow/include \
    MAILROOM_STAGING_ROOT=/opt/airflow/staging
