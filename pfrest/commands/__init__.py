"""The commands of the ``pfrest`` program, one module each, named for it: handle, serve, check, query,
stats, cache, demo, init; and what only commands use: crosscheck and postconf (``check --postfix``),
localhttp (``stats`` and ``cache`` asking a running serve), minihttp (the demo's backend).  cli.py
parses the command line and calls one of these.  Never imported by the library below: nothing outside
this folder but cli.py imports from it."""
