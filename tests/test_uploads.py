"""Base64 as people's tools write it, and strict integer options (service/uploads.py), alone and end to end.

`decode_base64` (POST /classify JSON, /v2 BYTES) takes line breaks and whitespace (coreutils `base64` wraps at
76 columns, Windows tools with CRLF), the URL-safe alphabet, missing padding and a `data:...;base64,` prefix (a
browser's readAsDataURL), and still refuses anything else with 400 invalid_base64. `parse_depth` and
`parse_top_k` take an integer (not a bool) or a string of ASCII digits, and refuse floats, signs, spaces and
non-ASCII digits with 422, wherever the option comes from (query string, form field, JSON body, /v2 parameter).
"""

from __future__ import annotations

import base64
import glob
import io
import os
import shutil
import subprocess

import httpx
import pytest
from PIL import Image

from conftest import REPO
from service.errors import ApiError
from service.uploads import decode_base64, parse_depth, parse_top_k
from support.live_server import LiveServer

SAMPLES = sorted(glob.glob(os.path.join(REPO, "samples", "fashion-mnist", "*.png")))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _photo() -> bytes:
    """A real sample scaled up and saved as a JPEG: a longer base64 text (hundreds of wrapped lines)."""
    buf = io.BytesIO()
    Image.open(SAMPLES[0]).convert("RGB").resize((280, 280), Image.BICUBIC).save(buf, "JPEG", quality=95)
    return buf.getvalue()


IMAGES = {os.path.basename(SAMPLES[0]): _read(SAMPLES[0]), os.path.basename(SAMPLES[3]): _read(SAMPLES[3])}
IMAGES["photo.jpg"] = _photo()


def _coreutils(data: bytes) -> str:
    """What `base64 image.png` prints: lines of 76 columns and a final newline."""
    if shutil.which("base64"):
        return subprocess.run(["base64"], input=data, capture_output=True, check=True).stdout.decode()
    return base64.encodebytes(data).decode()  # the same layout


def _wrap(text: str, width: int, sep: str) -> str:
    return sep.join(text[i : i + width] for i in range(0, len(text), width))


FORMS = {
    "standard": lambda d: base64.b64encode(d).decode(),
    "coreutils-76": _coreutils,
    "crlf-64": lambda d: _wrap(base64.b64encode(d).decode(), 64, "\r\n") + "\r\n",
    "spaces-and-tabs": lambda d: "  " + _wrap(base64.b64encode(d).decode(), 10, " \t") + "\n",
    "url-safe": lambda d: base64.urlsafe_b64encode(d).decode(),
    "url-safe-unpadded": lambda d: base64.urlsafe_b64encode(d).decode().rstrip("="),
    "unpadded": lambda d: base64.b64encode(d).decode().rstrip("="),
    "data-url": lambda d: "data:image/png;base64," + base64.b64encode(d).decode(),
    "data-url-octet-stream": lambda d: "data:application/octet-stream;base64," + base64.b64encode(d).decode(),
    "data-url-params-wrapped": lambda d: "DATA:image/jpeg;name=a.jpg;BASE64," + _coreutils(d),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(IMAGES))
def test_base64_as_tools_write_it(name, form):
    data = IMAGES[name]
    text = FORMS[form](data)
    if form in ("url-safe", "url-safe-unpadded") and not any(c in text for c in "-_"):
        pytest.skip("this image's base64 has neither - nor _")  # the form would be the standard one
    assert decode_base64(text, 0) == data


def test_unpadded_lengths():
    for n in range(1, 7):
        data = bytes(range(n))
        assert decode_base64(base64.b64encode(data).decode().rstrip("="), 0) == data


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("%%%", "'%'"),
        ("iVBORw0KGgo$AAAA", "'$'"),
        ("iVBO+w0K-ggo", "mixes"),
        ("data:image/png,iVBORw0KGgo", "data URL"),
        ("data:image/png;base64", "data URL"),
        ("iVBORw0KGgoÿ", "'ÿ'"),
        ("iVBORw0KG", "1 more than a multiple of 4"),
        ("QQ===", ""),
        ("QQ==QQ==", ""),
        ("=QQQ", ""),
        ("iVBORw0KGgo\x00", "'\\x00'"),
    ],
)
def test_garbage_is_still_refused(text, why):
    with pytest.raises(ApiError) as e:
        decode_base64(text, 3)
    assert e.value.status == 400 and e.value.code == "invalid_base64"
    assert e.value.message.startswith("image 3 ") and why in e.value.message, e.value.message


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (4, 4), ("3", 3), ("03", 3), ("auto", None), (None, None)])
def test_depth_accepts_integers_and_ascii_digits(value, expected):
    assert parse_depth(value, 4) == expected


@pytest.mark.parametrize(
    "value", [2.7, 2.0, True, False, "２", "٢", "+2", "-2", " 2", "2 ", "2.0", "", "0x2", "1e0", "Auto", [2], {"d": 2}]
)
def test_depth_refuses_anything_else_with_what_is_accepted(value):
    with pytest.raises(ApiError) as e:
        parse_depth(value, 4)
    assert e.value.status == 422 and e.value.code == "invalid_option"
    assert "a JSON integer or a string of ASCII digits" in e.value.message and "'auto'" in e.value.message


@pytest.mark.parametrize("value", [0, 5, "0", "5", "99999999999999999999999", "9" * 5000])
def test_depth_out_of_range(value):
    with pytest.raises(ApiError) as e:
        parse_depth(value, 4, "max_depth")
    assert e.value.status == 422 and "max_depth must be in 1..4" in e.value.message
    assert len(e.value.message) < 100


def test_top_k():
    assert parse_top_k(None, 5, 10) == 5 and parse_top_k(None, 50, 10) == 10
    assert parse_top_k(3, 5, 10) == 3 and parse_top_k("10", 5, 10) == 10
    for bad in (2.0, True, "３", "+3", " 3", "3.0", "auto", "x" * 10_000):
        with pytest.raises(ApiError) as e:
            parse_top_k(bad, 5, 10)
        assert e.value.status == 422 and "top_k must be an integer in 1..10" in e.value.message
        assert len(e.value.message) < 150
    with pytest.raises(ApiError, match="top_k must be in 1..10, got 11"):
        parse_top_k("11", 5, 10)


# End to end: the same checks wherever the input comes from.


@pytest.fixture(scope="module")
def server():
    s = LiveServer(max_batch_size=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(server):
    """Each image's top class, sent as a raw body."""
    out = {}
    for name, data in IMAGES.items():
        kind = "image/jpeg" if name.endswith(".jpg") else "image/png"
        r = httpx.post(server.url + "/classify", content=data, headers={"Content-Type": kind}, timeout=30)
        assert r.status_code == 200, r.text
        out[name] = r.json()["results"][0]["predictions"][0]["class_id"]
    return out


def test_classify_json_takes_every_form(server, expected):
    names, forms = list(IMAGES), list(FORMS)
    texts = [FORMS[form](IMAGES[name]) for form in forms for name in names]
    r = httpx.post(server.url + "/classify", json={"images": texts}, timeout=30)
    assert r.status_code == 200, r.text
    got = [x["predictions"][0]["class_id"] for x in r.json()["results"]]
    assert got == [expected[name] for _ in forms for name in names]


def test_v2_bytes_take_every_form(server, expected):
    name = next(iter(IMAGES))
    texts = [FORMS[form](IMAGES[name]) for form in FORMS]
    body = {"inputs": [{"name": "image_bytes", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]
    k = len(probs) // len(texts)
    tops = [max(range(k), key=lambda j, i=i: probs[i * k + j]) for i in range(len(texts))]
    assert tops == [expected[name]] * len(texts)


def test_garbage_base64_is_400_in_both_apis(server):
    r = httpx.post(server.url + "/classify", json={"images": [FORMS["standard"](IMAGES["photo.jpg"]), "ab$cd"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_base64"
    assert r.json()["error"]["message"].startswith("image 1 ")
    body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["data:image/png,abc"]}]}
    r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json=body)
    assert r.status_code == 400 and "data URL" in r.json()["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b'"depth": 2.0',
        b'"depth": 2.7',
        b'"depth": true',
        b'"depth": "\xef\xbc\x92"',
        b'"top_k": 3.0',
        b'"max_depth": " 2"',
    ],
)
def test_json_options_are_strict(server, raw):
    body = b'{"image": "' + FORMS["standard"](IMAGES["photo.jpg"]).encode() + b'", ' + raw + b"}"
    r = httpx.post(server.url + "/classify", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_option"
    assert "a JSON integer or a string of ASCII digits" in r.json()["error"]["message"]


def test_json_options_as_digit_strings_are_taken(server):
    body = {"image": FORMS["standard"](IMAGES["photo.jpg"]), "depth": "3", "top_k": "2", "max_depth": 4}
    r = httpx.post(server.url + "/classify", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["depth"] == 3 and len(result["predictions"]) == 2


@pytest.mark.parametrize("query", ["depth=%EF%BC%92", "top_k=%2B2", "depth=2.0", "max_depth=%202", "top_k=1e1"])
def test_query_options_are_strict(server, query):
    r = httpx.post(
        f"{server.url}/classify?{query}", content=IMAGES["photo.jpg"], headers={"Content-Type": "image/jpeg"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_option"


def test_form_fields_are_strict(server):
    files = {"file": ("a.jpg", IMAGES["photo.jpg"], "image/jpeg")}
    r = httpx.post(server.url + "/classify", files=files, data={"depth": "２"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"
    r = httpx.post(server.url + "/classify", files=files, data={"depth": "2", "top_k": "03"})
    assert r.status_code == 200 and r.json()["results"][0]["depth"] == 2
    assert len(r.json()["results"][0]["predictions"]) == 3


@pytest.mark.parametrize("depth", [2.0, True, "２"])
def test_v2_depth_parameter_is_strict(server, depth):
    body = {
        "inputs": [
            {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [FORMS["standard"](IMAGES["photo.jpg"])]}
        ],
        "parameters": {"depth": depth},
    }
    r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json=body)
    assert r.status_code == 422, r.text
    assert "a JSON integer or a string of ASCII digits" in r.json()["error"]
