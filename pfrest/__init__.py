"""pfrest: answer Postfix table lookups and policy checks from a REST backend.

Its folders are the floors of docs/architecture.md, lowest first: protocol, config, system, backend,
identity, cache, ops, conversation, process, commands; then cli.py, which parses the command line.  The
top holds only what every part uses (log, addresses, tracing) and nothing that imports from a folder
but cli."""

__version__ = "0.1.0"
