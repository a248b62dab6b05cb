"""sdk_scripts.import_gcs: manifests, sidecars, matching, dedupe and the report."""

from __future__ import annotations

import json

import pytest

from sdk_scripts.common import UserError
from sdk_scripts.import_gcs import (
    format_report,
    gather_metadata,
    manifest_format,
    pair_sidecars,
    parse_manifest,
    plan_import,
    resolve_key,
)

OBJECTS = ["cells/a.png", "cells/b.png", "cells/c.jpg", "cells/sub/d.tif"]


def test_manifest_format_by_extension():
    assert [manifest_format(n) for n in ("m.csv", "m.TSV", "m.jsonl", "m.ndjson", "m.json")] == [
        "csv",
        "csv",
        "jsonl",
        "jsonl",
        "json",
    ]
    with pytest.raises(UserError, match="unknown format"):
        manifest_format("m.xlsx")


def test_csv_manifest_guesses_the_key_column_and_drops_empty_cells():
    text = "\ufeffobject_name,sample,stain\ncells/a.png,S1,DAPI\ncells/b.png,S2,\n"
    manifest = parse_manifest(text, "csv")
    assert manifest.key_field == "object_name"
    assert manifest.rows == {"cells/a.png": {"sample": "S1", "stain": "DAPI"}, "cells/b.png": {"sample": "S2"}}


def test_csv_manifest_with_named_key_tabs_and_duplicates():
    text = "file\tsample\na.png\tS1\na.png\tS2\n\tS3\n"
    manifest = parse_manifest(text, "csv", key_field="file")
    assert manifest.rows == {"a.png": {"sample": "S2"}}
    assert any("twice" in w for w in manifest.warnings) and any("no 'file'" in w for w in manifest.warnings)


def test_csv_manifest_without_a_key_column_is_a_user_error():
    with pytest.raises(UserError, match="no key column"):
        parse_manifest("sample,stain\nS1,DAPI\n", "csv")
    with pytest.raises(UserError, match="more cells than the header"):
        parse_manifest("image,sample\na.png,S1,extra\n", "csv")


def test_json_lines_and_json_manifests_keep_types():
    lines = '{"image": "a.png", "sample": "S1", "depth": 3, "tags": ["x"]}\n\n{"image": "b.png", "depth": 4.5}\n'
    assert parse_manifest(lines, "jsonl").rows == {
        "a.png": {"sample": "S1", "depth": 3, "tags": ["x"]},
        "b.png": {"depth": 4.5},
    }
    as_list = json.dumps([{"name": "a.png", "sample": "S1"}])
    assert parse_manifest(as_list, "json").rows == {"a.png": {"sample": "S1"}}
    as_object = json.dumps({"a.png": {"sample": "S1"}, "gs://src/cells/b.png": {"sample": "S2"}})
    assert parse_manifest(as_object, "json").rows == {
        "a.png": {"sample": "S1"},
        "gs://src/cells/b.png": {"sample": "S2"},
    }
    # An unreadable line is kept as a lost row; it no longer refuses the whole manifest (issue 8).
    broken = parse_manifest('{"image": "a.png"}\n{not json}\n', "jsonl")
    assert broken.rows == {"a.png": {}} and len(broken.lost) == 1 and "line 2" in broken.lost[0]
    assert "JSON object" in parse_manifest('["a.png"]\n', "jsonl").lost[0]


def test_resolve_key_accepts_object_names_relative_names_and_uris_of_the_same_bucket():
    names = set(OBJECTS)
    assert resolve_key("cells/a.png", "src", "cells", names) == "cells/a.png"
    assert resolve_key("a.png", "src", "cells", names) == "cells/a.png"
    assert resolve_key("sub/d.tif", "src", "cells", names) == "cells/sub/d.tif"
    assert resolve_key("/cells/b.png", "src", "cells", names) == "cells/b.png"
    assert resolve_key("gs://src/cells/c.jpg", "src", "cells", names) == "cells/c.jpg"
    assert resolve_key("gs://other/cells/c.jpg", "src", "cells", names) is None
    assert resolve_key("d.tif", "src", "cells", names) is None  # no basename guessing
    assert resolve_key("missing.png", "src", "cells", names) is None


def test_pair_sidecars_prefers_the_full_name_and_reports_orphans():
    names = ["p/a.png", "p/a.png.json", "p/a.json", "p/b.jpg", "p/b.json", "p/c.png", "p/orphan.json", "p/manifest.csv"]
    sidecars, orphans = pair_sidecars(names)
    assert sidecars == {"p/a.png": "p/a.png.json", "p/b.jpg": "p/b.json"}
    assert orphans == ["p/a.json", "p/orphan.json"]


def test_gather_metadata_merges_sidecars_and_manifest_and_lists_unmatched():
    objects = OBJECTS + ["cells/a.png.json", "cells/lost.json"]
    sidecars, orphans = pair_sidecars(objects)
    manifest = parse_manifest("image,sample\na.png,S1\ncells/b.png,S2\nghost.png,S9\n", "csv")
    documents = {"cells/a.png.json": {"sample": "from-sidecar", "stain": "DAPI"}}
    metadata, unmatched = gather_metadata("src", "cells", objects, manifest, documents, sidecars, orphans)
    assert metadata == {"cells/a.png": {"sample": "S1", "stain": "DAPI"}, "cells/b.png": {"sample": "S2"}}
    assert sorted(unmatched) == ["cells/lost.json", "ghost.png"]


def test_plan_import_skips_existing_tasks_and_reports_missing_metadata():
    images = ["cells/a.png", "cells/b.png", "cells/c.jpg"]
    metadata = {"cells/a.png": {"sample": "S1", "image": "evil"}, "cells/c.jpg": {"sample": "S3"}}
    plan = plan_import(
        "src", images, metadata, existing_uris={"gs://src/cells/c.jpg"}, metadata_without_image=["ghost.png"]
    )
    assert plan.tasks == ({"image": "gs://src/cells/a.png", "sample": "S1"}, {"image": "gs://src/cells/b.png"})
    assert plan.already_imported == ("cells/c.jpg",)
    assert plan.without_metadata == ("cells/b.png",)
    assert plan.metadata_without_image == ("ghost.png",)
    assert any("'image' ignored" in w for w in plan.warnings)
    again = plan_import(
        "src", images, metadata, existing_uris=[t["image"] for t in plan.tasks] + ["gs://src/cells/c.jpg"]
    )
    assert again.tasks == () and len(again.already_imported) == 3


def test_plan_import_uses_the_configured_data_key():
    plan = plan_import("src", ["x.png"], {"x.png": {"image": "kept"}}, [], data_key="img")
    assert plan.tasks == ({"img": "gs://src/x.png", "image": "kept"},)


def test_report_names_the_problems():
    plan = plan_import("src", ["c/a.png", "c/b.png"], {"c/a.png": {"s": 1}}, [], metadata_without_image=["z.png"])
    report = format_report(plan, "gs://src/c", imported=2, dry_run=False)
    assert "images found:            2 under gs://src/c" in report
    assert "imported:                2" in report
    assert "images without metadata: 1: c/b.png" in report
    assert "metadata without images: 1: z.png" in report
    dry = format_report(plan, "gs://src/c", imported=None, dry_run=True)
    assert "would import:            2 (dry run" in dry
    many = plan_import("src", [f"c/{i:02}.png" for i in range(15)], {}, [])
    assert "(5 more)" in format_report(many, "gs://src/c", 0, False)


def test_a_metadata_key_the_frontend_reserves_is_imported_with_one_warning():
    """`$source` shows the whole serialised task in Label Studio's UI, not the metadata."""
    metadata = {"a.png": {"source": "lab 1"}, "b.png": {"source": "lab 2", "stain": "DAPI"}}
    plan = plan_import("bkt", ["a.png", "b.png"], metadata, [])
    assert [task["source"] for task in plan.tasks] == ["lab 1", "lab 2"]  # nothing is lost
    reserved = [w for w in plan.warnings if "reserved" in w]
    assert len(reserved) == 1 and "'source'" in reserved[0] and "dataset" in reserved[0]


def test_the_default_label_config_uses_no_reserved_variable_and_source_is_flagged():
    from sdk_scripts.common import DEFAULT_LABEL_CONFIG, label_config_warnings

    assert label_config_warnings(DEFAULT_LABEL_CONFIG.read_text()) == []
    [warning] = label_config_warnings('<View><Header value="Source: $source"/></View>')
    assert "$source" in warning and "reserved" in warning
    assert label_config_warnings('<View><Header value="$sources"/></View>') == []
