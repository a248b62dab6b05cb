"""Hypothesis strategies for what Label Studio 1.23 sends an ML backend, valid and mangled.

Shapes follow ../shared/notes/label-studio-facts.md: /setup bodies, batch and interactive
/predict bodies (smart rectangles and keypoints in PERCENT of original_width/height, including
NaN, infinities, negative, huge and zero-area values), and webhook events. Strings hold no lone
surrogates (the server refuses any body with one before routing it: see test_fuzz_endpoints.py's
last tests), so the fuzzers explore past the request parser.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from tests.support.payloads import LABEL_CONFIG, POLYGON_CONFIG, PROJECT, WEBHOOK_ACTIONS

LABELS = ("Nucleus", "Cell")

short_text = st.text(max_size=12)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), short_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(short_text, children, max_size=3)),
    max_leaves=8,
)

hostile_numbers = st.sampled_from(
    [
        0,
        -0.0,
        -1,
        -50,
        100,
        100.0001,
        150,
        1e-320,
        1e15,
        1e308,
        -1e308,
        1.7e308,
        -1.7e308,
        float("nan"),
        float("inf"),
        float("-inf"),
        2**63,
        -(2**63),
        10**30,
    ]
)
percent = st.one_of(
    st.floats(0, 100),
    st.floats(0, 100),
    st.floats(0, 100),  # mostly sensible
    hostile_numbers,
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**64), 2**64),
    st.sampled_from([None, "10", "", True, [], {}]),
)
label_lists = st.one_of(
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=2),
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=2),
    st.just([]),
    st.lists(st.one_of(short_text, st.sampled_from(["Mitochondrion", "nucleus", ""])), max_size=2),
    json_scalars,
)
image_sizes = st.one_of(st.sampled_from([(160, 120), (32, 24), (1, 1)]), st.tuples(json_scalars, json_scalars))


def _omit_some(region: dict) -> st.SearchStrategy[dict]:
    """The region, or the region with one of its keys dropped."""
    return st.one_of(
        st.just(region), st.sampled_from(sorted(region)).map(lambda key: {k: v for k, v in region.items() if k != key})
    )


@st.composite
def rectangles(draw) -> dict:
    width, height = draw(image_sizes)
    value = {
        "x": draw(percent),
        "y": draw(percent),
        "width": draw(percent),
        "height": draw(percent),
        "rotation": draw(st.one_of(st.just(0), st.just(0), hostile_numbers, st.floats(-720, 720))),
        "rectanglelabels": draw(label_lists),
    }
    region = {
        "original_width": width,
        "original_height": height,
        "image_rotation": draw(
            st.one_of(st.just(0), st.just(0), st.sampled_from([90, 360, -90, "0", None, float("nan")]))
        ),
        "value": draw(_omit_some(value)),
        "id": draw(short_text),
        "from_name": "box",
        "to_name": draw(st.sampled_from(["image", "image", "image", "other", "", None])),
        "type": draw(st.sampled_from(["rectanglelabels"] * 4 + ["keypointlabels", "brushlabels", "", None])),
        "origin": "manual",
    }
    return draw(_omit_some(region))


@st.composite
def keypoints(draw) -> dict:
    width, height = draw(image_sizes)
    value = {"x": draw(percent), "y": draw(percent), "width": 0.6, "keypointlabels": draw(label_lists)}
    region = {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": draw(_omit_some(value)),
        "is_positive": draw(st.one_of(st.booleans(), st.booleans(), st.sampled_from(["false", 0, 1, None, "yes"]))),
        "id": draw(short_text),
        "from_name": "point",
        "to_name": draw(st.sampled_from(["image", "image", "image", "other"])),
        "type": draw(st.sampled_from(["keypointlabels"] * 4 + ["rectanglelabels", "polygonlabels"])),
        "origin": "manual",
    }
    return draw(_omit_some(region))


regions = st.one_of(rectangles(), rectangles(), keypoints(), keypoints(), json_values)
contexts = st.one_of(
    st.none(),
    st.fixed_dictionaries({"result": st.lists(regions, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"result": st.lists(regions, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"result": st.lists(regions, max_size=4)}),
    st.fixed_dictionaries({"result": json_values}),
    st.dictionaries(short_text, json_values, max_size=3),
)


def image_uris(known: Sequence[str]) -> st.SearchStrategy:
    """Image references: `known` URLs (served on loopback, good and bad), forbidden ones, and junk.
    Every http(s) URL is either on loopback or refused before any connection is made."""
    forbidden = [
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/",
        "http://2852039166/",
        "http://[fd00:ec2::254]/",
        "ftp://127.0.0.1/x.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "//evil.example/x.png",
        "http://evil.example/x.png",
        "https://10.0.0.1/x.png",
        "javascript:alert(1)",
        "gs://bucket/missing.png",
        "s3://bucket/x.png",
        "azure-blob://c/x.png",
        "/data/upload/1/missing.png",
        "/data/local-files/?d=../../etc/passwd",
        "",
        "   ",
        "http://",
        "http://127.0.0.1:notaport/x.png",
    ]
    return st.one_of(
        st.sampled_from(list(known)),
        st.sampled_from(list(known)),
        st.sampled_from(forbidden),
        short_text,
        st.builds(lambda base, path: base + path, st.sampled_from(list(known)), short_text),
        json_scalars,
    )


def tasks(uris: st.SearchStrategy) -> st.SearchStrategy[dict]:
    task_ids = st.one_of(
        st.integers(1, 10**6), st.integers(1, 10**6), st.sampled_from([0, -1, 2**63, 10**30]), json_scalars
    )
    valid = st.builds(
        lambda task_id, uri: {
            "id": task_id,
            "data": {"image": uri},
            "meta": {},
            "annotations": [],
            "predictions": [],
            "project": 1,
            "is_labeled": False,
        },
        task_ids,
        uris,
    )
    return st.one_of(
        valid,
        valid,
        valid,
        st.dictionaries(short_text, json_values, max_size=3),
        st.fixed_dictionaries({"id": task_ids, "data": json_values}),
    )


label_configs = st.one_of(
    st.just(LABEL_CONFIG),
    st.just(LABEL_CONFIG),
    st.just(LABEL_CONFIG),
    st.just(POLYGON_CONFIG),
    st.sampled_from(
        [
            "",
            "<View/>",
            "not xml at all",
            "<View><Image name='image' value='$image'/></View>",
            "<View><Image name='image' value='image'/><BrushLabels name='t' toName='image'><Label value='A'/></BrushLabels></View>",
            "<View><Image name='image' value='$image'/><BrushLabels name='t' toName='image'/></View>",
            "<View><Image name='img' value='$picture'/><BrushLabels name='t' toName='img'><Label value='Nucleus'/></BrushLabels></View>",
            '<!DOCTYPE v [<!ENTITY a "aaaaaaaa">]><View>&a;</View>',
            LABEL_CONFIG.replace("</View>", ""),
            LABEL_CONFIG + "<junk>",
        ]
    ),
    short_text,
    st.none(),
)
projects = st.one_of(st.just(PROJECT), st.just(PROJECT), st.integers(-5, 10**6), short_text, st.just(None))


def predict_bodies(uris: st.SearchStrategy) -> st.SearchStrategy[dict]:
    params = st.one_of(
        st.fixed_dictionaries(
            {
                "login": st.one_of(st.none(), short_text),
                "password": st.one_of(st.none(), short_text),
                "context": contexts,
            },
            optional={"extra": json_values, "tasks": json_values, "kwargs": json_values},
        ),
        st.dictionaries(st.one_of(short_text, st.sampled_from(["self", "tasks", "context"])), json_values, max_size=3),
        st.none(),
    )
    return st.fixed_dictionaries(
        {"tasks": st.lists(tasks(uris), max_size=4)},
        optional={"project": projects, "label_config": label_configs, "params": params},
    )


setup_bodies = st.fixed_dictionaries(
    {"project": projects, "schema": label_configs},
    optional={
        "hostname": st.one_of(st.none(), st.just("http://localhost:8080"), short_text),
        "access_token": st.one_of(st.none(), st.just("0123456789abcdef0123456789abcdef01234567"), short_text),
        "extra_params": st.one_of(st.none(), st.dictionaries(short_text, json_values, max_size=3)),
        "model_version": json_values,
    },
)


def webhook_bodies(uris: st.SearchStrategy) -> st.SearchStrategy[dict]:
    project_refs = st.one_of(
        st.fixed_dictionaries(
            {"id": st.one_of(st.integers(-3, 10**6), short_text, st.none())},
            optional={"label_config": label_configs, "title": short_text},
        ),
        projects,
        json_values,
    )
    return st.fixed_dictionaries(
        {"action": st.one_of(st.sampled_from(WEBHOOK_ACTIONS), st.sampled_from(WEBHOOK_ACTIONS), short_text)},
        optional={
            "project": project_refs,
            "tasks": st.one_of(st.lists(tasks(uris), max_size=3), json_values),
            "annotation": st.one_of(
                st.fixed_dictionaries({"id": st.integers(1, 99), "result": st.lists(regions, max_size=2)}), json_values
            ),
            "task": st.one_of(tasks(uris), json_values),
        },
    )


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
get_requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        "suffix": st.sampled_from(["", "", "", "/", "?", "//", "/x", "%00"]),
        "params": st.dictionaries(header_text, header_text, max_size=3),
        "headers": st.dictionaries(
            st.sampled_from(
                [
                    "Accept",
                    "Accept-Encoding",
                    "Authorization",
                    "X-Forwarded-For",
                    "Range",
                    "Content-Type",
                    "If-None-Match",
                    "Cookie",
                    "X-Request-Id",
                ]
            ),
            header_text,
            max_size=4,
        ),
        "body": st.one_of(st.none(), st.binary(max_size=64)),
    }
)
