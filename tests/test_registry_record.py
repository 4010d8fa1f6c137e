"""Unit tests of the registry's pure parts: records, names, URL redaction, validation."""

from __future__ import annotations

import json

import pytest

from registry import (
    MAX_RECORD_BYTES,
    BadRecordError,
    RegistryConfigError,
    TeacherRecord,
    TeacherRegistration,
    TeacherWatcher,
    connect,
    decode_record,
    encode_record,
    redact_url,
)
from registry.urls import scrub, url_password


def make_record(**changes) -> TeacherRecord:
    fields = dict(endpoint="10.1.2.3:50051", service="imagenet-r101", model_name="resnet101", model_version="v3",
                  max_batch_size=64, device="cuda:1", teacher_id="t1")
    fields.update(changes)
    return TeacherRecord(**fields)


def test_record_roundtrips_through_json():
    record = make_record(in_flight=2, queued=5, requests_total=9, started_at=1.5, updated_at=2.5)
    data = encode_record(record)
    assert decode_record(data) == record
    assert decode_record(data.decode()) == record
    assert record.load == 7


def test_unknown_fields_are_ignored_for_forward_compatibility():
    obj = json.loads(encode_record(make_record()))
    obj["added_in_a_later_release"] = {"x": 1}
    assert decode_record(json.dumps(obj).encode()) == make_record()


def _json(**changes) -> bytes:
    obj = json.loads(encode_record(make_record()))
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"\xff\xfe\x00garbage", "not valid UTF-8 JSON", id="garbage-bytes"),
        pytest.param(b"{not json", "not valid UTF-8 JSON", id="not-json"),
        pytest.param(b"[1, 2]", "must be a JSON object", id="array"),
        pytest.param(_json(schema=2), "schema version 2 is not supported", id="newer-schema"),
        pytest.param(_json(schema=True), "schema version True", id="bool-schema"),
        pytest.param(b'{"schema": 1, "endpoint": "h:1"}', "lacks required field(s): model_name, service, teacher_id", id="missing"),
        pytest.param(_json(max_batch_size="64"), "max_batch_size must be an integer >= 1", id="str-int"),
        pytest.param(_json(in_flight=-1), "in_flight must be an integer >= 0", id="negative"),
        pytest.param(_json(queued=True), "queued must be an integer", id="bool-int"),
        pytest.param(_json(endpoint="no-port"), "endpoint must be 'host:port'", id="endpoint-no-port"),
        pytest.param(_json(endpoint="h:70000"), "port in 1-65535", id="endpoint-port-range"),
        pytest.param(_json(endpoint="0.0.0.0:5000"), "wildcard bind address", id="endpoint-wildcard"),
        pytest.param(_json(service="bad name!"), "service must be", id="service-name"),
        pytest.param(_json(started_at=float("nan")), "started_at must be unix seconds", id="nan-time"),
        pytest.param(_json(model_name=""), "model_name must not be empty", id="empty-model"),
        pytest.param(_json(device="x" * 300), "device must be a string of at most 256", id="long-text"),
        pytest.param(b" " * (MAX_RECORD_BYTES + 1), f"over the {MAX_RECORD_BYTES}-byte limit", id="oversized"),
        # Deeper than the json module's recursion limit, yet under the size limit.
        pytest.param(b"[" * MAX_RECORD_BYTES, "nested too deeply", id="deeply-nested"),
        pytest.param(b"[{\"a\":" * 600, "nested too deeply", id="deeply-nested-objects"),
    ],
)
def test_decode_rejects_malformed_records_naming_the_problem(data, expected):
    with pytest.raises(BadRecordError) as info:
        decode_record(data)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_ipv6_endpoint_is_accepted():
    assert make_record(endpoint="[fd00::1]:50051").endpoint == "[fd00::1]:50051"


def test_encode_refuses_oversized_record():
    # Each text field is capped at 256 characters, so only many fields of
    # multi-byte characters can overflow; build one past validation.
    record = make_record(model_name="é" * 256, model_version="\u20ac" * 256, device="\U0001f600" * 256)
    with pytest.raises(BadRecordError, match="over the 4096-byte limit"):
        encode_record(record)


def test_record_replace_rejects_unknown_field():
    with pytest.raises(BadRecordError, match="unknown TeacherRecord field"):
        make_record().replace(gpu_temp=80)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://alice:s3cr%2Ft@redis:6379/0", "redis://alice:***@redis:6379/0"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://bob:s3cret@redis:6380/1?ssl_cert_reqs=required", "rediss://bob:***@redis:6380/1?ssl_cert_reqs=required"),
        ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0?password=%2A%2A%2A"),
        ("redis://alice@redis:6379/0", "redis://alice@redis:6379/0"),
        ("unix:///run/redis.sock?password=s3cret&db=2", "unix:///run/redis.sock?password=%2A%2A%2A&db=2"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("rediss://:pw@redis:6380/0?ssl_ca_certs=/certs/a@b.pem", "rediss://:***@redis:6380/0?ssl_ca_certs=/certs/a@b.pem"),
        ("unix:///run/a@b/redis.sock", "unix:///run/a@b/redis.sock"),
        # Unescaped '/', '?' or '#' in a password end the authority early; nothing of it may show.
        ("redis://:p@ss/w:rd#1@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://alice:pa?ss=x@redis:6379/0", "redis://alice:***@redis:6379/0"),
        ("redis://alice:12/x@redis:6379/0", "redis://alice:***@redis:6379/0"),
        ("redis://alice:1#frag@redis:6379/0", "redis://alice:***@redis:6379/0"),
        ("redis://alice:p@w?x=c@redis:6379/0", "redis://alice:***@redis:6379/0"),
        ("redis://:a/b@redis:6379/0?password=zz", "redis://:***@redis:6379/0?password=%2A%2A%2A"),
    ],
)
def test_redact_url_hides_passwords_only(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("password", ["pQ@ssZ/wX:rdY#1", "aQ?bX=cY@dZ", "xQ#yX/zY"])
def test_unescaped_passwords_are_scrubbed_and_refused_clearly(password):
    url = f"redis://alice:{password}@redis:6379/0"
    assert url_password(url) == password
    assert password not in scrub(f"failed for {url}: {password}", url)
    with pytest.raises(RegistryConfigError, match="must be percent-escaped") as info:
        connect(url)
    for marker in "QXYZ":  # every piece of the password carries one
        assert marker not in str(info.value)


def test_scrub_removes_url_and_password_from_text():
    url = "redis://u:s3cr%2Ft@h:1/0"
    text = f"failed for {url}; password s3cr/t; quoted s3cr%2Ft"
    assert "s3cr" not in scrub(text, url)


def test_connect_rejects_bad_urls_without_echoing_the_password():
    with pytest.raises(RegistryConfigError) as info:
        connect("http://u:topsecret@host:1/0")
    assert "topsecret" not in str(info.value)
    assert "http://u:***@host:1/0" in str(info.value)
    with pytest.raises(RegistryConfigError, match="embedded Redis"):
        connect("local")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"heartbeat_s": 3.0, "ttl_s": 3.0}, "ttl_s must be greater than heartbeat_s"),
        ({"heartbeat_s": 0.0}, "heartbeat_s must be > 0, got 0.0"),
        ({"startup_timeout_s": -1}, "startup_timeout_s must be >= 0, got -1"),
    ],
)
def test_registration_validates_timing_at_construction(kwargs, expected):
    with pytest.raises(RegistryConfigError, match=expected):
        TeacherRegistration("redis://127.0.0.1:1/0", "imagenet-r101", make_record(), **kwargs)


def test_registration_requires_matching_service():
    with pytest.raises(RegistryConfigError, match="does not match service 'other'"):
        TeacherRegistration("redis://127.0.0.1:1/0", "other", make_record())


@pytest.mark.parametrize("service", ["", "has space", "x" * 129, "{brace}", "-leading"])
def test_watcher_rejects_bad_service_names(service):
    with pytest.raises(RegistryConfigError, match="service must be"):
        TeacherWatcher("redis://127.0.0.1:1/0", service)


def test_connect_understands_tls_and_acl_urls_without_connecting():
    from redis.connection import SSLConnection

    client = connect("rediss://student:pw@redis.example:6380/2?ssl_cert_reqs=required")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is SSLConnection
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("student", "pw", 2)
    assert kwargs["socket_timeout"] == 2.0 and kwargs["retry"].get_retries() == 0
