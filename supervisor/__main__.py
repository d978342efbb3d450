"""`python -m supervisor ...` is `trainsup ...` (useful before the console script is on PATH)."""

from supervisor.cli import main

main(prog_name="trainsup")
