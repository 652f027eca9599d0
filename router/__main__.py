from router.cli import app

if __name__ == "__main__":  # not when a tokenization worker process imports it
    app()
