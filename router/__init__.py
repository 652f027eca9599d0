"""The router: HTTP front (`http/`), request validation (`validation/`), text handling
(`text/`) and continuous batching over the shards (`batching/`). See docs/architecture.md."""

VERSION = "0.1.0"
