"""The plain command line of ``pfrest handle`` that master.cf, xinetd and systemd give, read without
argparse: by cli.py, so that a handle process (one per Postfix connection) never loads argparse, and by
crosscheck.py, to recognise a pfrest handle in master.cf.  Never anything but that one command line."""

from pfrest import config


class HandleArgs:
    def __init__(self, name, config_path=config.DEFAULT_PATH, log_file=None):
        self.command, self.name, self.config, self.log_file = "handle", name, config_path, log_file


def handle_argv(argv):
    """``handle [-c FILE | --config FILE | --config=FILE] [--log-file PATH | --log-file=PATH] NAME``
    without argparse; None for anything else (help, errors, other orders), which argparse then takes."""
    if not argv or argv[0] != "handle":
        return None
    options, rest = {"-c": None, "--config": None, "--log-file": None}, list(argv[1:])
    name = None
    while rest:
        word = rest.pop(0)
        key, eq, value = word.partition("=")
        if key in options and key != "-c" and eq and value:
            options[key] = value
        elif word in options and rest and options[word] is None and not rest[0].startswith("-"):
            options[word] = rest.pop(0)
        elif name is None and word and not word.startswith("-"):
            name = word
        else:
            return None
    if name is None or (options["-c"] and options["--config"]):
        return None
    return HandleArgs(name, options["-c"] or options["--config"] or config.DEFAULT_PATH, options["--log-file"])
