"""`python -m supervisor ...` is `trainsup ...` (useful before the console script is on PATH)."""

from supervisor.entry import main

main()
