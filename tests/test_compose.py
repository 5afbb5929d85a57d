"""docker-compose.yml, nginx.conf and the Dockerfile agree with each other and with the settings.

No Docker engine runs in CI, so the files are parsed and checked here; the topology
they describe (Redis + two daphne nodes) is proven with real processes in test_redis.py.
"""

import math
import re
import shutil
import subprocess
import tomllib

import dj_database_url
import pytest
import yaml

from pingpong import workers
from pingpong.limits import SUPERVISOR_MEMORY_BYTES, memory_budget
from project import settings
from tests.processes import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
APP = SERVICES["app"]
APP_ENV = APP["environment"]
APP_CPUS = APP["deploy"]["resources"]["limits"]["cpus"]
# The image runs `serve --workers auto`: one worker per CPU of the container's quota.
APP_WORKERS = math.ceil(float(APP_CPUS))


def seconds(value: str) -> float:
    """A compose/nginx duration such as 15s, 2m or 1m30s in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", value))


def test_redis_has_a_healthcheck_and_keeps_nothing_on_disk():
    redis = SERVICES["redis"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "--save" in redis["command"]


def test_at_least_two_app_replicas_share_the_redis_url():
    assert APP["deploy"]["replicas"] >= 2
    assert APP_ENV["REDIS_URL"].startswith("redis://redis:")
    assert APP["depends_on"]["redis"]["condition"] == "service_healthy"


def test_postgres_has_a_healthcheck_a_volume_and_its_password_from_the_environment():
    postgres = SERVICES["postgres"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    volume = postgres["volumes"][0].split(":")
    assert volume[0] in COMPOSE["volumes"] and volume[1] == "/var/lib/postgresql/data"
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_app_replicas_use_the_postgres_service_and_wait_until_it_is_healthy():
    postgres = SERVICES["postgres"]["environment"]
    assert APP["depends_on"]["postgres"]["condition"] == "service_healthy"
    password = re.fullmatch(r"postgres://\w+:(\$\{POSTGRES_PASSWORD:\?[^}]*\})@.*", APP_ENV["DATABASE_URL"])
    assert password is not None, "the password comes from the environment, never the file"
    database = dj_database_url.parse(APP_ENV["DATABASE_URL"].replace(password.group(1), "secret"))
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["PORT"]) == ("postgres", 5432)
    assert (database["NAME"], database["USER"]) == (postgres["POSTGRES_DB"], postgres["POSTGRES_USER"])


def test_the_image_installs_the_postgres_driver_and_migrates_before_serving():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(dependency.startswith("psycopg[binary]") for dependency in dependencies)
    assert "pip install ." in DOCKERFILE
    assert '"manage.py", "serve", "--migrate"' in DOCKERFILE


def test_app_is_production_configured_and_checks_readiness():
    assert APP_ENV["DJANGO_DEBUG"] == "0"
    assert "?" in APP_ENV["DJANGO_SECRET_KEY"], "compose must refuse to start without a secret"
    assert "/readyz" in " ".join(APP["healthcheck"]["test"])


def test_every_app_variable_is_a_setting_the_project_reads():
    source = (ROOT / "project" / "settings.py").read_text()
    for name in APP_ENV:
        assert f'"{name}"' in source, f"{name} is set in compose but never read"


def test_stop_grace_period_outlasts_the_drain_and_the_supervisors_exit_margin():
    drain = float(APP_ENV["PINGPONG_DRAIN_SECONDS"]) + workers.EXIT_MARGIN_SECONDS
    assert seconds(APP["stop_grace_period"]) > drain


def test_load_balancer_listens_on_8000_with_the_repo_config():
    lb = SERVICES["lb"]
    assert "8000:8000" in lb["ports"]
    assert any(volume.startswith("./deploy/nginx.conf:") for volume in lb["volumes"])
    assert re.search(r"listen\s+8000;", NGINX)


def test_load_balancer_upgrades_websockets_and_sets_the_client_ip_header():
    assert "proxy_http_version 1.1;" in NGINX
    assert "proxy_set_header Upgrade $http_upgrade;" in NGINX
    assert "proxy_set_header Connection $connection_upgrade;" in NGINX
    header = APP_ENV["PINGPONG_PROXY_HEADER"]
    assert f"proxy_set_header {header} $remote_addr;" in NGINX


def test_load_balancer_passes_the_host_with_its_port_for_the_login_forms_csrf_origin_check():
    assert "proxy_set_header Host $http_host;" in NGINX


def test_load_balancer_read_timeout_outlasts_the_heartbeat():
    heartbeat = float(APP_ENV["PINGPONG_PING_INTERVAL"]) + float(APP_ENV["PINGPONG_PING_TIMEOUT"])
    read_timeout = seconds(re.search(r"proxy_read_timeout\s+(\S+);", NGINX).group(1))
    assert read_timeout > heartbeat


def test_nginx_caps_connections_per_client_address_above_the_app_cap():
    """nginx counts per $binary_remote_addr across replicas and workers; the app's own per-worker cap answers first."""
    assert re.search(r"^\s*limit_conn_zone \$binary_remote_addr zone=per_ip:\d+m;", NGINX, re.MULTILINE)
    nginx_cap = int(re.search(r"^\s*limit_conn per_ip (\d+);", NGINX, re.MULTILINE).group(1))
    app_cap = int(APP_ENV["PINGPONG_MAX_CONNECTIONS_PER_IP"])
    assert 0 < app_cap <= int(APP_ENV["PINGPONG_MAX_CONNECTIONS"])
    assert nginx_cap == app_cap * APP_WORKERS * APP["deploy"]["replicas"]


def test_nginx_drops_a_handshake_that_never_finishes_its_head():
    """limit_conn cannot count a request whose head never arrives; the header timeout ends it."""
    timeout = seconds(re.search(r"client_header_timeout\s+(\S+);", NGINX).group(1))
    assert 0 < timeout <= settings.PINGPONG_HTTP_IDLE_TIMEOUT


def test_nginx_body_limit_matches_the_api_limit():
    limit = re.search(r"client_max_body_size\s+(\d+)k;", NGINX).group(1)
    assert int(limit) * 1024 == settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def test_image_serves_with_the_project_server_command():
    assert '"manage.py", "serve"' in DOCKERFILE
    assert "STOPSIGNAL SIGTERM" in DOCKERFILE


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever is installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker compose config` on the project's file, or a skip where compose is not installed."""
    command = compose_command()
    if command is None:
        pytest.skip("docker compose is not installed (the file is still checked by the tests above)")
    return subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **env},
        timeout=60,
    )


SECRETS = {"DJANGO_SECRET_KEY": "x" * 50, "POSTGRES_PASSWORD": "p" * 32}


def test_compose_config_validates_where_docker_compose_exists():
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_a_secret(secret):
    result = compose_config({name: value for name, value in SECRETS.items() if name != secret})
    assert result.returncode != 0
    assert secret in result.stderr


def dockerfile_env() -> dict[str, str]:
    """The ENV variables the image sets."""
    block = re.search(r"^ENV (.*?)\n\n", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert block is not None
    return dict(re.findall(r"(\w+)=(\S+)", block.group(1)))


def size(value: str) -> int:
    """A compose memory size such as 512M or 1G in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMG])", value).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** "KMG".index(unit) * 1024


def test_every_worker_full_with_every_client_at_its_caps_fits_in_the_container_memory_limit():
    """Compose's env over the image's over the settings' defaults: the worst case of each of the
    container's workers (its CPU quota), and the supervisor, fit the memory limit."""
    effective = {**dockerfile_env(), **APP_ENV}

    def setting(name: str) -> int:
        return int(effective.get(name, getattr(settings, name)))

    budget = memory_budget(
        connections=setting("PINGPONG_MAX_CONNECTIONS"),
        max_message_bytes=setting("PINGPONG_MAX_MESSAGE_BYTES"),
        max_pending_bytes=setting("PINGPONG_MAX_PENDING_BYTES"),
    )
    workers_memory = APP_WORKERS * budget + (SUPERVISOR_MEMORY_BYTES if APP_WORKERS > 1 else 0)
    assert workers_memory <= size(APP["deploy"]["resources"]["limits"]["memory"])


def test_the_image_serves_one_worker_per_cpu():
    assert '"--workers", "auto"' in DOCKERFILE


def test_the_image_and_compose_agree_on_the_connection_cap():
    assert dockerfile_env()["PINGPONG_MAX_CONNECTIONS"] == APP_ENV["PINGPONG_MAX_CONNECTIONS"]
