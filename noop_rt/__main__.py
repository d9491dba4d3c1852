from noop_rt.cli import run

run()
