"""Unit tests with no sockets: every option in config.OPTIONS refuses a bad value with a message that says how to fix it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imgclass import config
from imgclass.errors import ConfigError

# A value each parser refuses, by the parser's name.
INVALID = {
    "port": "70000",
    "positive_int": "abc",
    "non_negative_int": "-1",
    "positive_float": "0",
    "non_negative_float": "-2",
    "integer": "1.5",
    "percent": "120",
    "redis_url": "localhost:6379",
    "fraction": "1.5",
    "min_max": "8:1",
    "url": "10.0.0.1:5000",
    "text": "   ",
    "choice": "nope",
    "url_list": "10.0.0.1:5000",
    "service_time": "fast",
    "log_level": "loud",
}
# Every message names what to give instead.
HINTS = ("give ", "is not one of", "write ", "use ", "remove ", "such as")


def parse(argv: list[str], names: list[str], environ: dict[str, str] | None = None) -> object:
    parser = config.make_parser("t", "t")
    config.add_options(parser, names, environ=environ or {})
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", list(config.OPTIONS))
def test_every_option_refuses_a_bad_value_and_says_how_to_fix_it(name: str) -> None:
    option = config.OPTIONS[name]
    bad = INVALID[option.parse.__name__]
    with pytest.raises(ConfigError) as flag_error:
        parse([option.flag, bad], [name])
    message = flag_error.value.message
    assert option.flag in message and "--help" in message, message
    assert any(hint in message for hint in HINTS), message
    assert "invalid literal" not in message and "Traceback" not in message
    with pytest.raises(ConfigError) as env_error:
        parse([], [name], {option.env: bad})
    assert option.env in env_error.value.message and "Fix or unset" in env_error.value.message


def test_every_option_documents_its_default_and_variable() -> None:
    for option in config.OPTIONS.values():
        assert option.roles, f"{option.name} belongs to no command"
        assert set(option.roles) <= set(config.ROLES)
        assert option.describe() and "{" not in option.describe()


def test_choices_come_from_the_tables_where_the_classes_are() -> None:
    from imgclass.balancing.policies import POLICIES
    from imgclass.serving.backends import BACKENDS

    assert config.OPTIONS["policy"].describe().endswith(", ".join(POLICIES))
    assert config.OPTIONS["backend"].describe().endswith(", ".join(BACKENDS))
    with pytest.raises(ConfigError, match="is not one of: " + ", ".join(POLICIES)):
        parse(["--policy", "fastest"], ["policy"])


@pytest.mark.parametrize(
    "argv",
    [["up", "--servers", "abc"], ["serve", "--max-batch", "x"], ["balance", "--timeout", "-1"], ["testbed", "rspec",
     "--servers", "abc"]],
)  # fmt: skip
def test_the_commands_say_what_to_fix_without_a_traceback(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "imgclass", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "give a" in proc.stderr and "--help" in proc.stderr, proc.stderr


def test_backend_urls_are_plain_http_without_credentials() -> None:
    assert config.url_list("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    for bad, hint in [("https://a:1", "plain HTTP"), ("http://u:secret@a:1", "credentials"),
                      ("http://a:99999", "invalid port"), ("http://a:1/?x=1", "query")]:  # fmt: skip
        with pytest.raises(ValueError, match=hint) as error:
            config.url(bad)
        assert "secret" not in str(error.value)
