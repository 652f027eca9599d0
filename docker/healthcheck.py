#!/usr/bin/env python3
"""The images' HEALTHCHECK: GET /health on the launcher's port; exit 0 on 200, else 1.

The port is the one the launcher listens on: its `--port`/`-p` flag when the container was
started with one (`docker run IMAGE --port 8080`, read from PID 1's command line: the launcher
itself, or the init that runs it with `docker run --init`), else $PORT, else 80. The host is
the launcher's --hostname (or $HOSTNAME) when that is one IP address, else localhost. Standard
library only: the images have no curl.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import urllib.request

LAUNCHERS = ("launcher", "text-generation-launcher")


def launcher_args(cmdline: str = "/proc/1/cmdline") -> list[str]:
    """The arguments after the launcher's name in `cmdline`; [] when it runs no launcher."""
    try:
        with open(cmdline, "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
    for i, arg in enumerate(argv):
        if os.path.basename(arg) in LAUNCHERS:  # also `python -m launcher`
            return argv[i + 1 :]
    return []


def flag_value(args: list[str], long: str, short: str | None = None) -> str | None:
    """The last value given to a flag (`--port 80`, `--port=80`, `-p 80`, `-p80`), as click."""
    value = None
    for i, arg in enumerate(args):
        if arg in (long, short) and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(long + "="):
            value = arg[len(long) + 1 :]
        elif short and arg.startswith(short) and not arg.startswith("--") and len(arg) > 2:
            value = arg[len(short) :]
    return value


def health_url(args: list[str], environ: dict[str, str]) -> str:
    port = flag_value(args, "--port", "-p") or environ.get("PORT") or "80"
    host = "localhost"
    hostname = flag_value(args, "--hostname") or environ.get("HOSTNAME", "")
    try:
        address = ipaddress.ip_address(hostname)
        if not address.is_unspecified:  # 0.0.0.0 and :: listen on localhost too
            host = f"[{address}]" if address.version == 6 else str(address)
    except ValueError:  # a container's name: the launcher listens on 0.0.0.0
        pass
    return f"http://{host}:{int(port)}/health"


def main() -> int:
    url = health_url(launcher_args(), dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = response.status
    except Exception as err:  # noqa: BLE001 - refused, timed out, 503: all unhealthy
        print(f"{url}: {err}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
