from embedtune.cli import app

app()
