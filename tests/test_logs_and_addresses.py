"""TGI's LOG_LEVEL filters as one Python level, and HOSTNAME as TGI's router binds it."""

from __future__ import annotations

import pytest

from common.logs import python_level
from router.cli import bind_address


@pytest.mark.parametrize(
    "log_filter, level",
    [
        ("info", "info"),
        ("WARN", "warning"),
        ("trace", "debug"),
        ("off", "critical"),
        ("", "info"),
        ("warn,text_generation_router=debug", "debug"),
        ("text_generation_launcher=error,text_generation_server=info", "info"),  # most verbose
        ("router=debug", "debug"),  # our own module names count too
        ("hyper=trace,error", "error"),  # a library's directive is ignored
    ],
)
def test_tgi_log_filters(log_filter, level):
    assert python_level(log_filter) == level


@pytest.mark.parametrize("log_filter", ["verbose", "info,router=loud"])
def test_unknown_levels_are_refused(log_filter):
    with pytest.raises(ValueError, match="invalid LOG_LEVEL"):
        python_level(log_filter)


@pytest.mark.parametrize(
    "hostname, address",
    [
        ("0.0.0.0", "0.0.0.0"),
        ("127.0.0.1", "127.0.0.1"),
        ("::", "::"),
        ("textgen-7f9c6d-x2v4q", "0.0.0.0"),  # a pod's name, as Kubernetes sets HOSTNAME
        ("localhost", "0.0.0.0"),  # TGI parses an IP address only
    ],
)
def test_hostname_binds_as_tgi(hostname, address):
    assert bind_address(hostname) == address
