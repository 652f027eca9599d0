from shard.cli import app

app()
