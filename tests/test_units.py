"""Unit tests with no sockets: config, service times, top-k, errors, log lines."""

from __future__ import annotations

import logging
import random
import statistics
import time

import numpy as np
import pytest

from imgclass import config, errors, log
from imgclass.config import parse_duration, parse_service_time
from imgclass.serving.batching import top_k
from imgclass.serving.payload import image_from_multipart
from imgclass.web.forms import MAX_FIELD_VALUE, form_fields, multipart_boundary


def _parse(argv: list[str], names: list[str], environ: dict[str, str] | None = None):
    parser = config.make_parser("t", "t")
    config.add_options(parser, names, environ=environ or {})
    return parser.parse_args(argv)


def test_env_fallback_and_flag_precedence() -> None:
    ns = _parse([], ["port", "max_batch"], {"IMGCLASS_PORT": "6000"})
    assert ns.port == 6000 and ns.max_batch == config.OPTIONS["max_batch"].default
    assert _parse(["--port", "7000"], ["port"], {"IMGCLASS_PORT": "6000"}).port == 7000


def test_invalid_env_names_the_variable() -> None:
    with pytest.raises(errors.ConfigError, match=r"IMGCLASS_PORT='x'.*Fix or unset"):
        _parse([], ["port"], {"IMGCLASS_PORT": "x"})


def test_invalid_flag_says_what_is_expected() -> None:
    with pytest.raises(errors.ConfigError, match="0 to 65535"):
        _parse(["--port", "70000"], ["port"])
    with pytest.raises(errors.ConfigError, match="http"):
        _parse(["--backends", "10.0.0.1:5000"], ["backends"])


def test_url_list() -> None:
    assert config.url_list("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(("text", "seconds"), [("20ms", 0.02), ("1.5s", 1.5), ("300us", 0.0003), ("2", 2.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["exp", "exp:", "uniform:5ms", "lognormal:20ms", "const:-1ms", "exp:fast"])
def test_bad_service_times(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_service_time(bad)


@pytest.mark.parametrize("spec", ["exp:20ms", "const:5ms", "lognormal:20ms,0.5"])
def test_service_time_mean_and_spread(spec: str) -> None:
    dist = parse_service_time(spec)
    rng = random.Random(12345)
    samples = [dist.sample(rng) for _ in range(40_000)]
    assert statistics.fmean(samples) == pytest.approx(dist.mean, rel=0.02)
    assert statistics.pstdev(samples) == pytest.approx(dist.std, rel=0.05, abs=1e-12)


def test_top_k_exact() -> None:
    probs = np.array([0.1, 0.5, 0.05, 0.3, 0.05], np.float32)
    assert [i for i, _ in top_k(probs, 3)] == [1, 3, 0]
    assert top_k(probs, 10)[0] == (1, pytest.approx(0.5))


def test_error_tree_statuses() -> None:
    assert issubclass(errors.TooManyPixels, errors.RequestError)
    assert errors.TooManyPixels("x").status == 422
    assert errors.UnsupportedFormat("x").status == 415
    assert errors.PayloadTooLarge("x").status == 413
    overloaded = errors.Overloaded("full", retry_after=0.2)
    assert overloaded.status == 503 and overloaded.http_headers() == {"Retry-After": "1"}
    assert overloaded.to_json() == {"error": "overloaded", "message": "full"}


def test_log_line_format(caplog: pytest.LogCaptureFixture) -> None:
    logger = log.get_logger("srv:1", "server")
    logging.getLogger("imgclass.server").propagate = True
    token = log.request_id.set("rid42")
    try:
        with caplog.at_level(logging.INFO, logger="imgclass.server"):
            logger.info("predict", status=200, message="two words")
    finally:
        log.request_id.reset(token)
        logging.getLogger("imgclass.server").propagate = False
    line = caplog.records[-1].getMessage()
    stamp, server, script, action, rest = line.split(" ", 4)
    assert stamp.endswith("Z") and (server, script, action) == ("srv:1", "server", "predict")
    assert rest == 'request_id=rid42 status=200 message="two words"'


# --- multipart extraction (payload.image_from_multipart) ---


def _form(parts: list[tuple[str, bytes]], boundary: str = "b0und4ry", end: bool = True) -> bytes:
    out = b""
    for name, data in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n\r\n'.encode()
        out += data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if end else b"")


@pytest.mark.parametrize(
    "ctype", ["multipart/form-data; boundary=b0und4ry", 'multipart/form-data; boundary="b0und4ry"']
)
def test_multipart_finds_image_after_other_fields(ctype: str) -> None:
    image = bytes(range(256)) * 40 + b"\r\n--b0und4r"  # binary, with a near-boundary inside
    body = _form([("policy", b"p2c"), ("image", image), ("image", b"second")])
    assert image_from_multipart(body, ctype) == image


def test_multipart_keeps_a_complete_image_part_even_if_the_rest_is_cut() -> None:
    body = _form([("image", b"JPEGDATA"), ("other", b"x")], end=False)[:-10]
    assert image_from_multipart(body, "multipart/form-data; boundary=b0und4ry") == b"JPEGDATA"


@pytest.mark.parametrize(
    ("body", "ctype", "error"),
    [
        (_form([("photo", b"x")]), "multipart/form-data; boundary=b0und4ry", errors.MissingField),
        (_form([("image", b"")]), "multipart/form-data; boundary=b0und4ry", errors.EmptyBody),
        (_form([("image", b"x")]), "multipart/form-data", errors.MissingField),
        (b"", "multipart/form-data; boundary=b0und4ry", errors.EmptyBody),
        (b"garbage without any boundary", "multipart/form-data; boundary=b0und4ry", errors.MissingField),
        (_form([("image", b"JPEG")])[:60], "multipart/form-data; boundary=b0und4ry", errors.MissingField),
    ],
    ids=["no image field", "empty image", "no boundary", "empty body", "garbage", "cut inside the image"],
)
def test_multipart_errors(body: bytes, ctype: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        image_from_multipart(body, ctype)


# --- the balancer's form parameters (payload.form_fields) ---

OPTIONS = frozenset({"policy", "number_backend_servers"})
FORM = "multipart/form-data; boundary=b0und4ry"


def test_form_fields_before_and_after_the_image() -> None:
    image = bytes(range(256)) * 40 + b'\r\n--b0und4r name="policy"\r\n\r\nfake\r\n'  # decoys inside the image
    body = _form([("policy", b" p2c "), ("image", image), ("number_backend_servers", b"2")])
    assert form_fields(body, FORM, OPTIONS) == {"policy": "p2c", "number_backend_servers": "2"}
    assert form_fields(body, 'multipart/form-data; boundary="b0und4ry"', OPTIONS)["policy"] == "p2c"


def test_form_fields_match_the_name_parameter_only_and_keep_the_first() -> None:
    body = b'--b0und4ry\r\nContent-Disposition: form-data; filename="policy"; name="image"\r\n\r\nX\r\n'
    body += _form([("policy", b"round_robin"), ("policy", b"random")])
    assert form_fields(body, FORM, OPTIONS) == {"policy": "round_robin"}


@pytest.mark.parametrize(
    ("ctype", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ("Multipart/Form-Data; BOUNDARY=abc; charset=utf-8", b"abc"),
        ('multipart/form-data; boundary="a b;c"', b"a b;c"),
        ("multipart/form-data;boundary=abc", b"abc"),
        ("multipart/form-data; xboundary=abc", None),
        ("multipart/form-data; boundary=", None),
        ("multipart/form-data", None),
    ],
)
def test_multipart_boundary(ctype: str, boundary: bytes | None) -> None:
    assert multipart_boundary(ctype) == boundary


@pytest.mark.parametrize(
    ("body", "ctype", "expected"),
    [
        (_form([("policy", b"p2c")]), "application/json", {}),
        (_form([("policy", b"p2c")]), "multipart/form-data", {}),
        (_form([("policy", b"p2c"), ("image", b"JPEG")])[:-30], FORM, {"policy": "p2c"}),
        (_form([("image", b"JPEG"), ("policy", b"p2c")])[:-30], FORM, {}),
        (b"no boundary here", FORM, {}),
        (_form([("number_backend_servers", b"9" * 500)]), FORM, {"number_backend_servers": "9" * MAX_FIELD_VALUE}),
    ],
    ids=[
        "not multipart",
        "no boundary parameter",
        "cut after the field",
        "cut inside the field",
        "garbage",
        "long value",
    ],
)
def test_form_fields_on_odd_bodies(body: bytes, ctype: str, expected: dict[str, str]) -> None:
    assert form_fields(body, ctype, OPTIONS) == expected


def test_sleep_backend_serves_back_to_back_whatever_the_handoff_costs() -> None:
    """Lindley's recursion: job 2 leaves S after job 1 left, even if the worker came back to it late."""
    from imgclass.serving.backends import BackendOptions, SleepBackend

    engine = SleepBackend(BackendOptions("/nonexistent", service_time="const:100ms", seed=1)).engine(0)
    batch = np.zeros((1, 224, 224, 3), np.uint8)
    arrived = time.perf_counter()
    engine(batch, arrived)
    time.sleep(0.04)  # a slow handoff between jobs: it must not lengthen the emulated service
    engine(batch, arrived)
    both = time.perf_counter() - arrived
    assert 0.195 <= both < 0.225, f"two 100 ms services took {both * 1000:.1f} ms"
    time.sleep(0.15)  # idle: the next job starts when it arrives, not when the last one left
    arrived = time.perf_counter()
    engine(batch, arrived)
    assert 0.095 <= time.perf_counter() - arrived < 0.125


def test_request_ids_are_unique_and_a_reseed_changes_the_stream() -> None:
    ids = {log.new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    state = log._ids.getstate()
    following = log.new_request_id()
    log._ids.setstate(state)
    log._reseed()  # what a forked child runs
    assert log.new_request_id() != following


def test_max_conn_for_every_policy_or_per_policy() -> None:
    from imgclass.measure.scaling import parse_max_conn

    both = ["random", "least_outstanding"]
    assert parse_max_conn("1", both) == {"random": 1, "least_outstanding": 1}
    assert parse_max_conn("least_outstanding=1", both) == {"random": 0, "least_outstanding": 1}
    assert parse_max_conn(" random=2, least_outstanding=1 ", both) == {"random": 2, "least_outstanding": 1}
    for bad, says in [("-1", "whole number"), ("x", "whole number"), ("random=-3", "whole number"),
                      ("nope=1", "unknown policy"), ("p2c=1", "not in --policies")]:  # fmt: skip
        with pytest.raises(SystemExit, match=says):
            parse_max_conn(bad, both)


def test_overlay_is_evaluated_at_the_measured_load_with_the_nominal_beside_it() -> None:
    import math

    from imgclass.measure.scaling import overlay_columns
    from imgclass.measure.stats import LatencySummary, RunSummary

    # n=1 at rho 0.8 nominally (40/s, 20 ms); the run realised 38/s and 21 ms services (rho 0.798)
    summary = RunSummary(
        offered_rate=40.0, scheduled_rate=38.0, achieved_rate=38.0, throughput=38.0, duration_s=100.0,
        sent=3800, ok=3800, dropped=0, errors={}, latency=LatencySummary.of([110.0, 110.0]),
        send_lag_p99_ms=0.1, backends={"a": 3800}, station_mean_ms=106.0, path_overhead_ms=4.0,
        upstream_mean_ms=22.0, service_mean_ms=21.0,
    )  # fmt: skip
    cols = overlay_columns("random", 1, 40.0, 0.020, True, summary, False, 1)
    measured = 21.0 / (1 - 38.0 * 0.021)  # M/M/1 at the realised load, ms
    assert cols["theory_queue_ms"] == pytest.approx(measured, abs=1e-3)
    assert cols["theory_mean_ms"] == pytest.approx(measured + 4.0, abs=1e-3)
    assert cols["theory_error"] == pytest.approx(110.0 / (measured + 4.0) - 1, abs=1e-4)
    assert cols["theory_nominal_ms"] == pytest.approx(100.0 + 4.0, abs=1e-3)
    assert cols["measured_utilisation"] == pytest.approx(0.798)
    assert cols["jsq_sim_ms"] is None
    # not exponential: no model, but the realised load is still reported
    cols = overlay_columns("random", 1, 40.0, 0.020, False, summary, False, 1)
    assert (
        cols["theory_mean_ms"] is None
        and cols["nominal_error"] is None
        and not math.isnan(cols["measured_utilisation"])
    )
