"""Load tests of this server beside its peers, in one run: `python -m benchmark --help`."""
