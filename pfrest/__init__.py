"""pfrest: answer Postfix table lookups and policy checks from a REST backend."""

__version__ = "0.1.0"
