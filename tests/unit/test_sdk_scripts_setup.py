"""sdk_scripts.setup_project: idempotency and what is sent, against an in-memory stand-in of the SDK client.

The real Label Studio is exercised in tests/e2e/test_gcs_flow.py; here the stand-in records every write.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from sdk_scripts.common import DEFAULT_LABEL_CONFIG, CliSettings, LabelStudioConnection, UserError
from sdk_scripts.setup_project import (
    BackendSpec,
    SetupOptions,
    build_parser,
    credentials_fingerprint,
    fields_to_update,
    normalise_xml,
    options_from_args,
    setup_project,
)

CONFIG = DEFAULT_LABEL_CONFIG.read_text()


class Collection:
    """One kind of object (storages, ML backends) kept as dicts, with list/create/update like the SDK."""

    def __init__(self, writes: list):
        self.items: list[dict] = []
        self.writes = writes

    def list(self, project: int):
        return [dict(item) for item in self.items if item["project"] == project]

    def create(self, project: int, **fields):
        item = {"id": 100 + len(self.items), "project": project, **fields}
        self.items.append(item)
        self.writes.append(("create", fields))
        return SimpleNamespace(**item)

    def update(self, id: int, **fields):
        item = next(i for i in self.items if i["id"] == id)
        item.update(fields)
        self.writes.append(("update", fields))
        return SimpleNamespace(**item)


class FakeProjects:
    def __init__(self, writes: list):
        self.items: list[dict] = []
        self.writes = writes

    def list(self, page_size: int = 100):
        return [SimpleNamespace(**p) for p in self.items]

    def get(self, id: int):
        return SimpleNamespace(**next(p for p in self.items if p["id"] == id))

    def create(self, title: str, label_config: str):
        project = {"id": len(self.items) + 1, "title": title, "label_config": label_config}
        self.items.append(project)
        self.writes.append(("create project", title))
        return SimpleNamespace(**project)

    def update(self, id: int, **fields):
        next(p for p in self.items if p["id"] == id).update(fields)
        self.writes.append(("update project", fields))


def fake_connection() -> tuple[LabelStudioConnection, list]:
    writes: list = []
    ls = SimpleNamespace(
        projects=FakeProjects(writes),
        import_storage=SimpleNamespace(gcs=Collection(writes)),
        export_storage=SimpleNamespace(gcs=Collection(writes)),
        ml=Collection(writes),
    )
    return LabelStudioConnection(ls=ls, url="http://ls.test"), writes


def options(**overrides) -> SetupOptions:
    base = dict(
        title="Nuclei",
        label_config=CONFIG,
        source=("raw", "images"),
        target=("labels", "v1"),
        backends=(
            BackendSpec("http://seg:7070", "Segmentation (U-Net)", False),
            BackendSpec("http://sam:9090", "Segment Anything (interactive)", True),
        ),
    )
    base.update(overrides)
    return SetupOptions(**base)


def test_second_run_changes_nothing():
    conn, writes = fake_connection()
    first = setup_project(conn, options(), progress=False)
    assert [(c.kind, c.action) for c in first] == [
        ("project", "created"),
        ("import storage", "created"),
        ("export storage", "created"),
        ("ml backend", "created"),
        ("ml backend", "created"),
    ]
    source = conn.ls.import_storage.gcs.items[0]
    assert (source["bucket"], source["prefix"], source["use_blob_urls"], source["presign"]) == (
        "raw",
        "images",
        True,
        False,
    )
    assert source["synchronizable"] is False and "png" in source["regex_filter"]
    assert conn.ls.ml.items[1]["is_interactive"] is True and conn.ls.ml.items[0]["is_interactive"] is False
    count = len(writes)
    second = setup_project(conn, options(), progress=False)
    assert [c.action for c in second] == ["unchanged"] * 5
    assert [c.id for c in second] == [c.id for c in first]
    assert len(writes) == count


def test_changes_update_only_what_differs():
    conn, writes = fake_connection()
    setup_project(conn, options(), progress=False)
    writes.clear()
    changed = setup_project(
        conn, options(presign=True, label_config=CONFIG.replace("Cell", "Cytoplasm")), progress=False
    )
    assert [c.action for c in changed] == ["updated", "updated", "unchanged", "unchanged", "unchanged"]
    assert writes[0][0] == "update project" and "Cytoplasm" in writes[0][1]["label_config"]
    assert writes[1] == ("update", {"presign": True})
    assert len(conn.ls.import_storage.gcs.items) == 1  # updated in place, never duplicated


def test_a_new_prefix_or_backend_url_adds_a_connection():
    conn, _ = fake_connection()
    setup_project(conn, options(), progress=False)
    setup_project(
        conn,
        options(source=("raw", "images2"), backends=(BackendSpec("http://seg:7070/", "Segmentation (U-Net)", False),)),
        progress=False,
    )
    assert [s["prefix"] for s in conn.ls.import_storage.gcs.items] == ["images", "images2"]
    assert len(conn.ls.ml.items) == 2  # the trailing slash names the same backend


def test_credentials_are_sent_once_and_only_a_fingerprint_is_compared():
    conn, writes = fake_connection()
    key = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----abc"}'
    setup_project(conn, options(storage_credentials=key, backends=()), progress=False)
    created = [fields for action, fields in writes if action == "create"]
    assert all(fields["google_application_credentials"] == key for fields in created)
    fingerprint = credentials_fingerprint(key)
    assert fingerprint in created[0]["description"] and "PRIVATE" not in fingerprint
    for item in conn.ls.import_storage.gcs.items + conn.ls.export_storage.gcs.items:
        item.pop("google_application_credentials")  # Label Studio never returns it
    writes.clear()
    assert [c.action for c in setup_project(conn, options(storage_credentials=key, backends=()), progress=False)] == [
        "unchanged"
    ] * 3
    setup_project(conn, options(storage_credentials=key + " ", backends=()), progress=False)
    assert all("google_application_credentials" in fields for _, fields in writes)


def test_duplicate_titles_are_refused():
    conn, _ = fake_connection()
    conn.ls.projects.create("Nuclei", CONFIG)
    conn.ls.projects.create("Nuclei", CONFIG)
    with pytest.raises(UserError, match="2 projects are titled"):
        setup_project(conn, options(), progress=False)


def test_pure_helpers():
    assert normalise_xml("<View>\n  <Image/>\n</View>\n") == "<View><Image/></View>"
    assert fields_to_update({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == {"b": 3, "c": None}
    assert credentials_fingerprint("") == ""


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_options_from_arguments(tmp_path):
    settings = CliSettings(basic_auth_user="ml", basic_auth_pass="pw")
    opts = options_from_args(
        parse(["--title", " T ", "--source", "gs://raw/img/", "--target", "gs://lab", "--presign", "--sam-url", ""]),
        settings,
    )
    assert (opts.title, opts.source, opts.target, opts.presign) == ("T", ("raw", "img"), ("lab", ""), True)
    assert [b.url for b in opts.backends] == ["http://localhost:7070"]
    assert (opts.basic_auth_user, opts.basic_auth_pass) == ("ml", "pw")
    assert options_from_args(parse(["--title", "T", "--skip-backends"]), settings).backends == ()
    with pytest.raises(UserError, match="cannot read label config"):
        options_from_args(parse(["--title", "T", "--label-config", str(tmp_path / "none.xml")]), settings)
    with pytest.raises(UserError, match="not a GCS location"):
        options_from_args(parse(["--title", "T", "--source", "s3://x"]), settings)
