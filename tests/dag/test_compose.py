"""docker-compose.yaml and the Dockerfile, checked against the code without a Docker engine.

The compose file is parsed as YAML (anchors and merge keys resolved) and interpolated with
.env.example the way Compose does it. Every command is parsed by the parser of the program that
will run it (Airflow 3.3.2's CLI, the dev server's, the ``mailroom`` CLI's), every environment
variable must be one that Airflow, Mailroom or the service's own script reads, and the paths,
connections and variables must be the ones Mailroom's code uses. Where the Docker Compose plugin
exists, ``docker compose config`` must accept the file too.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from mailroom.campaign_spec import load_campaign

pytestmark = pytest.mark.dag

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"

AIRFLOW_SERVICES = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
}
ONE_OFF = {"airflow-init"}
STAGING_VOLUME = "mailroom-staging"
# Third-party images: their default command, and the tool their health check runs.
THIRD_PARTY = {
    "postgres": ("postgres:", "pg_isready"),
    "redis": ("redis:", "redis-cli"),
    "mailpit": ("axllent/mailpit:", "/mailpit readyz"),
}
# Read by the image rather than by Airflow or Mailroom (documented by the official image).
IMAGE_ENV = {"DUMB_INIT_SETSID"}
CODE_DIRS = ("src", "plugins", "dags")

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# --- reading the files ------------------------------------------------------------------------
@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text("utf-8"))
    assert isinstance(data, dict)
    return data


@cache
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""
    env = env_example() if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        present = name in env
        set_and_not_empty = present and env[name] != ""
        if op in (":-", "-"):
            return env[name] if (set_and_not_empty if op == ":-" else present) else arg
        if op in (":?", "?"):
            if not (set_and_not_empty if op == ":?" else present):
                raise AssertionError(f"required variable {name} is missing: {arg}")
            return env[name]
        return env.get(name, "")

    return _INTERPOLATION.sub(replace, value)


def referenced_variables(text: str) -> set[str]:
    return {
        m.group("braced") or m.group("bare")
        for m in _INTERPOLATION.finditer(text)
        if m.group(0) != "$$"
    }


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def environment(name: str) -> dict[str, str]:
    env = services()[name].get("environment") or {}
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {k: str(v) for k, v in interpolate(env).items()}


def as_args(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def volume_mounts(name: str) -> dict[str, str]:
    """Volume (or bind source) → target path, from the short syntax."""
    mounts: dict[str, str] = {}
    for entry in services()[name].get("volumes") or []:
        assert isinstance(entry, str), f"{name}: use the short volume syntax"
        source, target = entry.split(":")[:2]
        mounts[source] = target
    return mounts


def init_script() -> str:
    init = services()["airflow-init"]
    assert init["entrypoint"] == "/bin/bash"
    args = as_args(init["command"])
    assert args[0] == "-c"
    assert len(args) == 2
    return str(interpolate(args[1]))


def shell_expand(text: str, env: dict[str, str]) -> str:
    """What bash makes of ``$NAME`` / ``${NAME}`` in one line, with unknown names as 'x'."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), "x"), text)


def airflow_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    commands = []
    for line in script.splitlines():
        line = re.sub(r"\s*(>/dev/null)?\s*(2>&1)?\s*(\|\|\s*true)?\s*$", "", line.strip())
        if line.startswith("airflow "):
            commands.append(shlex.split(shell_expand(line, env))[1:])
    return commands


@cache
def airflow_parser() -> Any:
    from airflow.cli.cli_parser import get_parser

    return get_parser()


def parse_airflow(args: list[str]) -> Any:
    try:
        return airflow_parser().parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"`airflow {' '.join(args)}` is not a valid Airflow 3.3.2 command ({exit_})")


def code_text() -> str:
    return "\n".join(
        p.read_text("utf-8") for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))
    )


# --- services, images, commands --------------------------------------------------------------
def test_the_expected_services_exist() -> None:
    expected = AIRFLOW_SERVICES | set(THIRD_PARTY) | {"sendgrid-dev", "mailroom-feedback"}
    assert expected <= set(services()), expected - set(services())


@pytest.mark.parametrize(
    "name", sorted(AIRFLOW_SERVICES | set(THIRD_PARTY) | {"sendgrid-dev", "mailroom-feedback"})
)
def test_every_service_has_an_image_or_build(name: str) -> None:
    service = services()[name]
    assert service.get("image") or service.get("build"), name
    if name in AIRFLOW_SERVICES or name in {"sendgrid-dev", "mailroom-feedback"}:
        # Our image: built from ./Dockerfile, tagged so every service runs the same build.
        assert service.get("build") in (".", {"context": "."}), name
        assert interpolate(service["image"]) == env_example()["MAILROOM_IMAGE"]


@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES - ONE_OFF))
def test_airflow_services_run_airflow_commands_that_exist(name: str) -> None:
    service = services()[name]
    assert "entrypoint" not in service, "the official entrypoint runs `airflow <command>`"
    args = as_args(service["command"])
    parse_airflow(args)
    expected = {
        "airflow-apiserver": ["api-server"],
        "airflow-scheduler": ["scheduler"],
        "airflow-dag-processor": ["dag-processor"],
        "airflow-triggerer": ["triggerer"],
        "airflow-worker": ["celery", "worker"],
    }[name]
    assert args[: len(expected)] == expected


def test_init_runs_commands_that_exist_and_is_valid_bash() -> None:
    script = init_script()
    checked = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    env = environment("airflow-init")
    commands = airflow_commands(script, env)
    for args in commands:
        parse_airflow(args)
    assert ["db", "migrate"] in commands
    # The inline Python must at least compile.
    for snippet in re.findall(r"python -c '([^']*)'", script):
        ast.parse(snippet)
    # The mailroom CLI subcommand it calls exists.
    from mailroom.cli.main import main

    for line in script.splitlines():
        if "mailroom sample-audience" in line:
            with pytest.raises(SystemExit) as exit_:
                main(["sample-audience", "--help"])
            assert exit_.value.code == 0


def test_dev_server_runs_the_project_console_script() -> None:
    import tomllib

    from sendgrid_dev.__main__ import build_parser

    service = services()["sendgrid-dev"]
    entrypoint = as_args(service["entrypoint"])
    assert entrypoint[:2] == ["/usr/bin/dumb-init", "--"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[2] in scripts
    assert scripts[entrypoint[2]] == "sendgrid_dev.__main__:main"
    args = build_parser().parse_args(as_args(service["command"]))
    assert args.host == "0.0.0.0"
    assert args.port == 3030
    assert str(args.data_dir) in volume_mounts("sendgrid-dev").values()
    # The connection's default host is this service.
    host = urlparse(environment("airflow-init")["SENDGRID_API_HOST"])
    assert (host.hostname, host.port) == ("sendgrid-dev", 3030)


def test_feedback_service_runs_the_mailroom_cli_on_its_own_with_what_it_reads(
    tmp_path: Path,
) -> None:
    import argparse
    import tomllib

    from mailroom.cli import feedback
    from mailroom.feedback.service import FeedbackSettings, create_app
    from mailroom.feedback.webhook_signature import PUBLIC_KEY_ENV
    from mailroom.unsubscribe import SECRETS_ENV, UnsubscribeKeys

    service = services()["mailroom-feedback"]
    entrypoint = as_args(service["entrypoint"])
    assert entrypoint[:2] == ["/usr/bin/dumb-init", "--"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[entrypoint[2]] == "mailroom.cli.main:main"
    parser = argparse.ArgumentParser()
    feedback.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(as_args(service["command"]))
    assert (args.command, args.feedback_command, args.host) == ("feedback", "serve", "0.0.0.0")
    assert not args.accept_unsigned_webhooks
    env = environment("mailroom-feedback")
    assert {SECRETS_ENV, PUBLIC_KEY_ENV, "MAILROOM_OUTBOX_URL"} <= set(env)
    assert all(key in code_text() for key in env)
    # The outbox Airflow writes to.
    outbox = urlparse(env["MAILROOM_OUTBOX_URL"])
    airflow_outbox = _connection_args("mailroom_outbox")
    assert (outbox.hostname, outbox.path.lstrip("/")) == ("postgres", airflow_outbox["conn_schema"])
    # Airflow signs links with the first of the keys the service verifies with.
    assert env[SECRETS_ENV] == environment("airflow-init")[SECRETS_ENV]
    # Published on the host's loopback only, and health-checked on a route the app serves.
    [published] = interpolate(service["ports"])
    assert published.startswith("127.0.0.1:")
    assert published.endswith(f":{args.port}")
    health = as_args(service["healthcheck"]["test"])
    assert health[-1] == f"http://localhost:{args.port}/healthz"
    app = create_app(
        FeedbackSettings(
            outbox_url=f"sqlite:///{tmp_path / 'outbox.sqlite'}",
            unsubscribe_keys=UnsubscribeKeys.parse("compose-test-key"),
            webhook_signature=None,
            unsigned_webhooks=True,
        )
    )
    assert "/healthz" in {getattr(route, "path", None) for route in app.routes}
    app.state.outbox.dispose()
    # Never part of Airflow: it neither mounts Airflow's volumes nor sets Airflow's settings.
    assert not service.get("volumes")
    assert not any(key.startswith("AIRFLOW") for key in env)


@pytest.mark.parametrize("name", sorted(THIRD_PARTY))
def test_third_party_services_run_their_image_defaults(name: str) -> None:
    prefix, health_tool = THIRD_PARTY[name]
    service = services()[name]
    assert str(service["image"]).startswith(prefix)
    assert "command" not in service
    assert "entrypoint" not in service
    assert health_tool in " ".join(as_args(service["healthcheck"]["test"]))


# --- health checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(compose()["services"]) - ONE_OFF))
def test_long_running_services_have_health_checks(name: str) -> None:
    check = services()[name].get("healthcheck") or {}
    test = as_args(check.get("test") or [])
    assert test, f"{name} has no health check"
    assert test[0] in {"CMD", "CMD-SHELL"}, test
    assert not check.get("disable")
    assert services()[name].get("restart") == "always"


def test_airflow_health_checks_call_what_exists() -> None:
    from airflow.configuration import conf

    for name in sorted(AIRFLOW_SERVICES - ONE_OFF):
        test = as_args(services()[name]["healthcheck"]["test"])
        command = " ".join(test[1:])
        if command.startswith("airflow "):
            parse_airflow(shell_expand(command, {"HOSTNAME": "host"}).split()[1:])
        elif command.startswith("celery --app "):
            # The module Celery loads defines ``app`` (found, not imported: importing it starts
            # the Celery app, which the distributed tier exercises for real).
            module, _, attr = shlex.split(command)[2].rpartition(".")
            spec = importlib.util.find_spec(module)
            assert spec is not None, command
            assert spec.origin, command
            tree = ast.parse(Path(spec.origin).read_text("utf-8"))
            assigned = {
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            }
            lazy = {  # a module-level __getattr__ that answers for the name
                c.value
                for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                for c in ast.walk(node)
                if isinstance(c, ast.Constant)
            }
            assert attr in assigned | lazy, command
        else:
            assert test[1:3] == ["curl", "--fail"], command
    scheduler = environment("airflow-scheduler")
    assert scheduler["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    port = conf.getint("scheduler", "scheduler_health_check_server_port")
    assert f"localhost:{port}/" in " ".join(services()["airflow-scheduler"]["healthcheck"]["test"])
    api_port = services()["airflow-apiserver"]["ports"][0].rsplit(":", 1)[1]
    assert f"localhost:{api_port}/api/v2/" in " ".join(
        services()["airflow-apiserver"]["healthcheck"]["test"]
    )


# --- executor, databases, staging --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES))
def test_celery_executor_with_redis_broker_and_postgres(name: str) -> None:
    env = environment(name)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    broker = urlparse(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis"
    assert broker.hostname == "redis"
    metadata_db = environment("postgres")["POSTGRES_DB"]
    for key, schemes in (
        ("AIRFLOW__CELERY__RESULT_BACKEND", {"db+postgresql", "db+postgresql+psycopg2"}),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", {"postgresql+psycopg2", "postgresql"}),
    ):
        url = urlparse(env[key])
        assert url.scheme in schemes, (key, url.scheme)
        assert url.hostname == "postgres", key
        assert url.path == f"/{metadata_db}", key
        assert url.username == environment("postgres")["POSTGRES_USER"]
        assert url.password == environment("postgres")["POSTGRES_PASSWORD"]
    execution_api = urlparse(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.hostname == "airflow-apiserver"
    assert execution_api.path == "/execution/"
    dependencies = services()[name]["depends_on"]
    for needed in ("postgres", "redis"):
        assert dependencies[needed]["condition"] == "service_healthy"


def test_every_airflow_service_has_the_same_settings() -> None:
    shared = {
        k: v
        for k, v in environment("airflow-scheduler").items()
        if k.startswith(("AIRFLOW__", "MAILROOM_"))
    }
    for name in AIRFLOW_SERVICES:
        env = environment(name)
        assert {k: env.get(k) for k in shared} == shared, name


def test_staging_volume_is_mounted_at_the_same_path_in_every_airflow_service() -> None:
    assert STAGING_VOLUME in compose()["volumes"]
    paths = set()
    for name in sorted(AIRFLOW_SERVICES):
        target = volume_mounts(name).get(STAGING_VOLUME)
        assert target, f"{name} does not mount {STAGING_VOLUME}"
        assert environment(name)["MAILROOM_STAGING_ROOT"] == target, name
        paths.add(target)
    assert len(paths) == 1, paths


STAGING_ON_S3 = {
    "MAILROOM_STAGING_ROOT": "s3://mailroom-staging/runs",
    "MAILROOM_STAGING_KEY_ID": "AKIAEXAMPLEKEY",
    "MAILROOM_STAGING_SECRET": "example-staging-secret",
    "MAILROOM_STAGING_ENDPOINT_URL": "http://minio:9000",
}


@pytest.mark.parametrize("endpoint", ["http://minio:9000", ""])
def test_object_storage_staging_is_one_setting_and_its_credentials_one_connection(
    endpoint: str,
) -> None:
    """With MAILROOM_STAGING_ROOT an s3:// URL, every Airflow service gets the URL, and
    airflow-init writes the connection the adapter reads its credentials from."""
    from mailroom.staging import is_url
    from mailroom_airflow import settings

    env = {**env_example(), **STAGING_ON_S3, "MAILROOM_STAGING_ENDPOINT_URL": endpoint}
    for name in sorted(AIRFLOW_SERVICES):
        service_env = interpolate(services()[name]["environment"], env)
        assert service_env["MAILROOM_STAGING_ROOT"] == STAGING_ON_S3["MAILROOM_STAGING_ROOT"]
        assert is_url(service_env["MAILROOM_STAGING_ROOT"])
    init_env = {
        k: str(v) for k, v in interpolate(services()["airflow-init"]["environment"], env).items()
    }
    script = str(interpolate(as_args(services()["airflow-init"]["command"])[1], env))
    # The extra is what the snippet prints for this endpoint.
    snippet = next(s for s in re.findall(r"python -c '([^']*)'", script) if "MAILROOM_STAGING" in s)
    printed = subprocess.run(
        [sys.executable, "-c", snippet],
        env={"MAILROOM_STAGING_ENDPOINT_URL": endpoint},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    extra = json.loads(printed)
    assert extra == ({"endpoint_url": endpoint} if endpoint else {})
    staging_conn = None
    # bash passes the expansion as one word, quotes and all: stand it in as one placeholder.
    for args in airflow_commands(script, {**init_env, "staging_extra": "STAGING_EXTRA"}):
        if args[:2] == ["connections", "add"] and args[2] == settings.STAGING_CONNECTION:
            staging_conn = vars(parse_airflow(args))
    assert staging_conn is not None, "airflow-init does not create the staging connection"
    assert staging_conn["conn_login"] == STAGING_ON_S3["MAILROOM_STAGING_KEY_ID"]
    assert staging_conn["conn_password"] == STAGING_ON_S3["MAILROOM_STAGING_SECRET"]
    assert staging_conn["conn_extra"] == "STAGING_EXTRA"
    assert '--conn-extra "${staging_extra}"' in script


def test_workers_scale() -> None:
    worker = services()["airflow-worker"]
    assert int(interpolate(str(worker["deploy"]["replicas"]))) >= 2
    for fixed in ("container_name", "hostname", "ports"):  # one per replica would clash
        assert fixed not in worker
    assert worker["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


def test_outbox_database_is_created_by_the_postgres_init_script() -> None:
    mounts = volume_mounts("postgres")
    scripts = {
        source: target
        for source, target in mounts.items()
        if target.startswith("/docker-entrypoint-initdb.d/")
    }
    assert len(scripts) == 1, mounts
    sql = (REPO / next(iter(scripts))).read_text()
    created = set(re.findall(r"CREATE DATABASE\s+(\w+)", sql, flags=re.IGNORECASE))
    outbox = _connection_args("mailroom_outbox")
    assert outbox["conn_schema"] in created
    assert outbox["conn_schema"] != environment("postgres")["POSTGRES_DB"]
    assert outbox["conn_host"] == "postgres"


# --- connections, variables, environment -------------------------------------------------------
def _connection_args(conn_id: str) -> dict[str, Any]:
    env = environment("airflow-init")
    for args in airflow_commands(init_script(), env):
        if args[:2] == ["connections", "add"] and args[2] == conn_id:
            return vars(parse_airflow(args))
    pytest.fail(f"airflow-init does not create connection {conn_id!r}")


def test_connections_and_variables_the_dag_reads_are_created_by_init() -> None:
    settings_source = (REPO / "src" / "mailroom_airflow" / "settings.py").read_text()
    needed = {
        conn_id
        for conn_id in ("mailroom_outbox", "mailroom_staging")
        if f'"{conn_id}"' in settings_source
    }
    for path in sorted((REPO / "include" / "campaigns").glob("*.yaml")):
        spec = load_campaign(path.parent, path.stem)
        needed |= {spec.connection_id}
        if spec.audience.connection_id:
            needed.add(spec.audience.connection_id)
    assert {"mailroom_users", "mailroom_sendgrid", "mailroom_outbox", "mailroom_staging"} <= needed
    for conn_id in sorted(needed):
        _connection_args(conn_id)
    # settings.sql_url: a sqlite or postgres connection, or any type with extra.sqlalchemy_url.
    users = _connection_args("mailroom_users")
    assert '"sqlalchemy_url"' in settings_source
    assert users["conn_type"] in {"sqlite", "postgres"} or (
        users["conn_extra"] and '{"sqlalchemy_url":' in init_script()
    )
    sendgrid = _connection_args("mailroom_sendgrid")
    assert sendgrid["conn_host"]
    assert sendgrid["conn_password"]

    variables = {
        args[2]
        for args in airflow_commands(init_script(), environment("airflow-init"))
        if args[:2] == ["variables", "set"]
    }
    assert "mailroom_unsubscribe_secret" in variables
    assert '"mailroom_unsubscribe_secret"' in settings_source


def test_campaign_approvers_are_users_of_the_auth_manager() -> None:
    users = {
        entry.split(":")[0]
        for entry in environment("airflow-apiserver")[
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"
        ].split(",")
    }
    for path in sorted((REPO / "include" / "campaigns").glob("*.yaml")):
        assert set(load_campaign(path.parent, path.stem).approvers) <= users, path.name
    # airflow-init writes a password for each of them, from .env.
    script = init_script()
    for user in users:
        assert f"AIRFLOW_{user.upper()}_PASSWORD" in script
        assert f"AIRFLOW_{user.upper()}_PASSWORD" in env_example()
    assert volume_mounts("airflow-apiserver")["airflow-auth"] == str(
        Path(
            environment("airflow-apiserver")["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
        ).parent
    )


@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES))
def test_every_environment_variable_is_read_by_something(name: str) -> None:
    from airflow.configuration import conf

    code = code_text()
    own_script = init_script() if name == "airflow-init" else ""
    for key in environment(name):
        if key.startswith("AIRFLOW__"):
            section, option = key[len("AIRFLOW__") :].lower().split("__", 1)
            options = conf.configuration_description.get(section, {}).get("options", {})
            assert option in options, f"{name}: Airflow has no option [{section}] {option}"
        elif key.startswith("MAILROOM_") and key in code:
            continue
        elif key == "GX_ANALYTICS_ENABLED":
            import great_expectations

            gx_dir = Path(great_expectations.__file__).parent
            assert any(key in p.read_text("utf-8") for p in gx_dir.rglob("*.py"))
        elif key in IMAGE_ENV:
            continue
        else:
            assert key in own_script, f"{name}: nothing reads {key}"


def test_every_referenced_variable_is_documented_in_env_example() -> None:
    referenced = referenced_variables(COMPOSE_FILE.read_text("utf-8"))
    missing = referenced - set(env_example())
    assert not missing, f"not in .env.example: {sorted(missing)}"
    unused = set(env_example()) - referenced - {"COMPOSE_PROFILES"}
    assert not unused, f".env.example sets what the compose file never reads: {sorted(unused)}"


def test_secrets_have_no_defaults_and_stay_out_of_git_and_images() -> None:
    text = COMPOSE_FILE.read_text("utf-8")
    for secret in (
        "POSTGRES_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_API_SECRET_KEY",
        "AIRFLOW_JWT_SECRET",
        "SENDGRID_API_KEY",
        "MAILROOM_UNSUBSCRIBE_SECRETS",
        "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY",
        "AIRFLOW_ANALYST_PASSWORD",
        "AIRFLOW_APPROVER_PASSWORD",
        "AIRFLOW_ADMIN_PASSWORD",
    ):
        uses = re.findall(r"(?<!\$)\$\{" + secret + r"([^}]*)\}", text)
        assert uses, secret
        assert all(u.startswith(":?") for u in uses), (secret, uses)
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert ".env" in (REPO / ".dockerignore").read_text().split()


# --- docker compose itself ---------------------------------------------------------------------
def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and re.search(r"\bv?2\.\d+", probe.stdout):
            return [standalone]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "the Docker Compose plugin is absent on this machine (`docker compose version` "
            "fails, and no Compose v2 `docker-compose` is on PATH): `docker compose config` "
            "cannot run here; the YAML-level checks in this file still ran"
        )
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- the Dockerfile ----------------------------------------------------------------------------
def test_dockerfile_base_image_matches_the_locked_airflow_version() -> None:
    lock = (REPO / "requirements.txt").read_text()
    pinned = re.search(r"^apache-airflow==(\S+)$", lock, flags=re.MULTILINE)
    assert pinned, "requirements.txt does not pin apache-airflow"
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(froms) == 1, froms
    image, _, tag = froms[0].partition(":")
    assert image == "apache/airflow"
    assert tag == f"{pinned.group(1)}-python3.11", (tag, pinned.group(1))
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["ruff"]["target-version"] == "py311"


def test_dockerfile_installs_the_lock_and_the_package_and_copies_what_airflow_loads() -> None:
    text = DOCKERFILE.read_text()
    runs = " ".join(re.findall(r"^RUN\s+(.*)$", text, flags=re.MULTILINE))
    assert re.search(r"pip install[^&]*-r \S*requirements\.txt", runs)
    assert re.search(r"pip install[^&]*--no-deps", runs)
    copies = dict(re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)/\s+(\S+?)/?$", text, flags=re.MULTILINE))
    env = environment("airflow-scheduler")
    assert copies.get("dags") == "/opt/airflow/dags"
    assert copies.get("plugins") == "/opt/airflow/plugins"
    assert copies.get("include") == env["MAILROOM_INCLUDE_DIR"]
