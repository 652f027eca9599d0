"""`python -m launcher`: see launcher.cli."""

from launcher.cli import app

app(prog_name="launcher")
