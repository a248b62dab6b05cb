"""sdk_scripts.common: settings, file-name sanitising, URIs, error handling of the command lines."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
from label_studio_sdk.core.api_error import ApiError

from devstack.processes import free_port
from sdk_scripts import common
from sdk_scripts.common import (
    CliSettings,
    UserError,
    api_error_detail,
    describe_api_error,
    original_uri,
    parse_gs_uri,
    run_main,
    safe_stem,
    unique_stems,
)

REPO = Path(__file__).resolve().parents[2]


def test_settings_from_env_reads_every_variable_and_hides_secrets():
    settings = CliSettings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "LABEL_STUDIO_API_KEY": " secret-token ",
            "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
            "STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "p4ss",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.label_studio_api_key == "secret-token"
    assert settings.google_application_credentials == "/k.json"
    assert settings.storage_emulator_host == "http://127.0.0.1:4443"
    assert (settings.basic_auth_user, settings.basic_auth_pass, settings.log_level) == ("u", "p4ss", "DEBUG")
    assert "secret-token" not in repr(settings) and "p4ss" not in repr(settings)
    assert CliSettings.from_env({}) == CliSettings()
    assert CliSettings.from_env({"LABEL_STUDIO_API_KEY": "Token abc123"}).label_studio_api_key == "abc123"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gs://bucket/a/b/cell_01.png", "cell_01"),
        ("gs://bucket/a/../../etc/passwd.png", "passwd"),
        ("..\\..\\windows\\win.ini", "win"),
        ("../..", "item"),
        ("", "item"),
        (".hidden.png", "hidden"),
        ("name with spaces & ünïcode.tif", "name_with_spaces_unicode"),
        ("細胞.png", "item"),
        ("/data/upload/3/abc-photo.JPG?token=xyz", "abc-photo"),
        ("archive.tar.gz", "archive.tar"),
        ("x" * 300 + ".png", "x" * 120),
    ],
)
def test_safe_stem(name, expected):
    stem = safe_stem(name)
    assert stem == expected
    assert "/" not in stem and "\\" not in stem and stem not in ("", ".", "..")


def test_unique_stems_add_the_key_only_on_collisions_case_insensitively():
    stems = unique_stems(["gs://b/x/a.png", "gs://b/y/a.png", "gs://b/A.jpg", "gs://b/c.png"], [1, 2, 3, 4])
    assert stems == ["a-1", "a-2", "A-3", "c"]
    assert len({s.lower() for s in stems}) == len(stems)


def test_parse_gs_uri():
    assert parse_gs_uri("gs://my-bucket") == ("my-bucket", "")
    assert parse_gs_uri("gs://my-bucket/some/prefix/") == ("my-bucket", "some/prefix")
    for bad in ("s3://bucket/x", "bucket/x", "gs://", "gs://UPPER/x"):
        with pytest.raises(UserError, match="not a GCS location"):
            parse_gs_uri(bad)


def test_original_uri_decodes_resolve_links_and_keeps_everything_else():
    uri = "gs://src/cells/a b.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    assert original_uri(f"/tasks/12/resolve/?fileuri={encoded}") == uri
    assert original_uri(f"http://ls:8080/tasks/12/resolve/?fileuri={encoded.rstrip('=')}") == uri
    assert original_uri("gs://src/x.png") == "gs://src/x.png"
    assert original_uri("/data/upload/1/x.png") == "/data/upload/1/x.png"


def test_api_errors_become_one_line_messages_without_html():
    body = {
        "detail": "Validation error",
        "validation_errors": {
            "non_field_errors": ["Can't connect to ML backend http://x, <a href='https://labelstud.io'>Learn more</a>"]
        },
    }
    detail = api_error_detail(body)
    assert "<a" not in detail and "Learn more" in detail and "\n" not in detail
    assert "401" in describe_api_error(ApiError(status_code=401, body={}), "list projects")
    assert "LABEL_STUDIO_API_KEY" in describe_api_error(ApiError(status_code=401, body={}), "x")


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def body() -> int:
        raise UserError("bucket gs://x does not exist")

    assert run_main(body) == 2
    err = capsys.readouterr().err
    assert err == "error: bucket gs://x does not exist\n"
    assert run_main(lambda: 0) == 0


def test_connect_without_url_or_key_is_a_user_error():
    with pytest.raises(UserError, match="LABEL_STUDIO_URL"):
        common.connect_label_studio(CliSettings(label_studio_api_key="k"))
    with pytest.raises(UserError, match="LABEL_STUDIO_API_KEY"):
        common.connect_label_studio(CliSettings(label_studio_url="http://127.0.0.1:1"))
    with pytest.raises(UserError, match="http"):
        common.connect_label_studio(CliSettings(label_studio_url="ftp://x", label_studio_api_key="k"))


def test_unreachable_label_studio_is_a_user_error():
    settings = CliSettings(label_studio_url=f"http://127.0.0.1:{free_port()}", label_studio_api_key="k")
    with pytest.raises(UserError, match="cannot reach Label Studio"):
        common.connect_label_studio(settings)


def test_gcs_client_uses_anonymous_credentials_for_the_emulator(monkeypatch):
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    client = common.gcs_client(CliSettings(storage_emulator_host="http://127.0.0.1:1"))
    assert isinstance(client._credentials, AnonymousCredentials) and client.project == "test"


def test_gcs_client_reports_a_missing_key_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        common.gcs_client(CliSettings(), str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="not a service-account key"):
        common.gcs_client(CliSettings(), str(bad))


@pytest.mark.parametrize("script", ["setup_project", "import_gcs", "export_masks"])
def test_scripts_have_help_and_fail_cleanly_without_configuration(script, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    shown = subprocess.run(
        [sys.executable, "-m", f"sdk_scripts.{script}", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "usage:" in shown.stdout
    args = {
        "setup_project": ["--title", "x", "--skip-backends"],
        "import_gcs": ["--project", "1", "--source", "gs://bucket/p"],
        "export_masks": ["--project", "1", "--out", str(tmp_path / "out")],
    }[script]
    failed = subprocess.run(
        [sys.executable, "-m", f"sdk_scripts.{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("error: no Label Studio URL")
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_unreachable_label_studio_from_the_command_line(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}",
        "LABEL_STUDIO_API_KEY": "0123456789abcdef-secret",
    }
    failed = subprocess.run(
        [sys.executable, "-m", "sdk_scripts.setup_project", "--title", "x", "--skip-backends"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 2 and "cannot reach Label Studio" in failed.stderr
    assert "Traceback" not in failed.stderr and "0123456789abcdef-secret" not in failed.stderr + failed.stdout
