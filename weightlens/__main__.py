from weightlens.cli import app

app(prog_name="weightlens")
