"""What every process of the server shares and that needs neither torch nor aiohttp."""
