"""The man pages as bin/pfrest-manpages writes them (as the package build runs it), rendered by groff:
every command and option of the argument parser is in pfrest(8), with the exit statuses, signals, files,
environment and metrics of docs/; docs/configuration.md's key tables list exactly the keys config.py
accepts, and pfrest.json(5) says for each key what those tables say, with the HTTP contract of
docs/http-contract.md; neither page sends its reader to the README."""

import argparse
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT, need_binary
from pfrest import cli, config

GENERATOR = f"{ROOT}/bin/pfrest-manpages"


def render(troff):
    """A page as man shows it, in plain text: groff with every warning on (lintian runs the same check),
    no bold or underline, lines long enough that no paragraph wraps."""
    proc = subprocess.run([need_binary("groff"), "-man", "-Tutf8", "-ww", "-P-cbou", "-rLL=5000n"], input=troff,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def words(text):
    return " ".join(text.split())


def sections(page):
    """{SECTION HEADING: text} of a rendered page."""
    parts = re.split(r"(?m)^([A-Z][A-Z -]+)$", page)
    return {heading: body for heading, body in zip(parts[1::2], parts[2::2])}


@pytest.fixture(scope="module")
def troff(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    subprocess.run([sys.executable, GENERATOR, str(out)], check=True, timeout=60)
    return {"pfrest.8": (out / "man8" / "pfrest.8").read_text(),
            "pfrest.json.5": (out / "man5" / "pfrest.json.5").read_text()}


@pytest.fixture(scope="module")
def pages(troff):
    return {name: render(text) for name, text in troff.items()}


def test_pages_render_without_warnings_as_man_shows_them(troff):
    """At man's own width, where a long word may have nowhere to break (``man -l man/pfrest.8``)."""
    for name, text in troff.items():
        proc = subprocess.run([need_binary("groff"), "-man", "-Tutf8", "-ww", "-z"], input=text,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", (name, proc.stderr)


@pytest.fixture(scope="module")
def generator():
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("pfrest_manpages", GENERATOR)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def doc_rows(generator):
    with open(f"{ROOT}/docs/configuration.md", encoding="utf-8") as f:
        return generator.key_tables(f.read())


def test_doc_tables_list_exactly_the_keys_config_accepts(doc_rows):
    top, endpoint = doc_rows
    for rows, keys in ((top, config.TOP_KEYS), (endpoint, config.ENDPOINT_KEYS)):
        listed = [row["key"].strip("`") for row in rows]
        assert sorted(listed) == sorted(set(listed)), "a key is listed twice"
        assert set(listed) - set(keys) == set(), "docs/configuration.md lists keys config.py does not accept"
        assert set(keys) - set(listed) == set(), "config.py accepts keys docs/configuration.md (and so the man page) lacks"


def test_config_page_says_what_the_doc_tables_say(pages, doc_rows, generator):
    page = sections(pages["pfrest.json.5"])
    for heading, rows in zip(("TOP-LEVEL KEYS", "ENDPOINT KEYS"), doc_rows):
        text = words(page[heading])
        for row in rows:
            facts = [generator.plain(row["type"])]
            default = generator.plain(row["default"])
            facts.append("required" if default == "required" else f"default: {default}")
            if "modes" in row:
                facts.append("modes: " + generator.plain(row["modes"]))
            entry = words(f"{row['key'].strip('`')} ({'; '.join(facts)}) {generator.plain(row['meaning'])}")
            assert entry in text, f"{heading}: {entry!r} not in\n{text}"
    with open(f"{ROOT}/pfrest.json.example", encoding="utf-8") as f:
        assert words(f.read()) in words(page["EXAMPLE"])


def commands(parser):
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def has_entry(text, option):
    """An option's entry: its tag line starts with the option, or names it after another ("-c, --config")."""
    return re.search(rf"(?m)^       (?:.*, )?{re.escape(option)}(?![\w-])", text)


def test_every_command_and_option_is_in_pfrest_8(pages):
    page = sections(pages["pfrest.8"])
    parser = cli._parser()
    # the COMMANDS section, one subsection per command ("   NAME" lines)
    parts = re.split(r"(?m)^   (\S+)$", page["COMMANDS"])
    described = dict(zip(parts[1::2], parts[2::2]))
    assert list(described) == list(commands(parser))
    for name, sub in commands(parser).items():
        assert f"pfrest {name} " in page["SYNOPSIS"]
        for action in sub._actions:
            for option in action.option_strings or [action.metavar or action.dest]:
                assert has_entry(described[name], option), (name, option)
            if action.help:
                help_text = sub._get_formatter()._expand_help(action)
                assert words(help_text) in words(described[name]), (name, help_text)
    for action in parser._actions:
        for option in action.option_strings:
            assert has_entry(page["OPTIONS"], option), option


def test_pfrest_8_has_the_exit_statuses_of_pfrest_help(pages):
    """The EXIT STATUS section says what ``pfrest --help`` says (both come from cli.EXIT_STATUSES)."""
    page = sections(pages["pfrest.8"])
    assert "EXIT STATUS" in page
    for code, text in cli.EXIT_STATUSES:
        assert re.search(rf"(?m)^ +{code}\b", page["EXIT STATUS"]) and words(text) in words(page["EXIT STATUS"]), code


def test_pfrest_8_has_signals_files_environment_and_metrics(pages):
    page = sections(pages["pfrest.8"])
    signals = words(page["SIGNALS"])
    for signame, what in (("SIGHUP", "reload"), ("SIGUSR1", "stats endpoint=NAME"), ("SIGTERM", "--drain-timeout"),
                          ("SIGINT", "A second one exits at once"), ("Workers ignore", "SIGHUP")):
        assert signame in signals and what in signals, (signame, what)
    for path in ("/etc/pfrest/pfrest.json", "/run/pfrest/control.sock", "/usr/share/doc/pfrest/examples/",
                 "pfrest.service", "pfrest-{tcp,socketmap,policy}.socket"):
        assert path in page["FILES"], path
    # every variable the code reads from the environment: os.environ[...], .get(...), env.get(...), and
    # handle's peer variables
    code = " ".join(path.read_text() for path in pathlib.Path(ROOT, "pfrest").rglob("*.py"))
    read = set(re.findall(r"""(?:environ|env)(?:\.get\(|\[)"([A-Z_]+)""", code))
    read |= set(re.findall(r'"([A-Z_]+)"', " ".join(re.findall(r"for var in \(([^)]*)\)", code))))
    assert {"LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "JOURNAL_STREAM", "REMOTE_ADDR", "PATH"} <= read, read
    assert [v for v in sorted(read) if v not in page["ENVIRONMENT"]] == []
    assert "pfrest_requests_total" in page["MONITORING"] and "/readyz" in page["MONITORING"]
    assert "pfrest.json(5)" in page["SEE ALSO"]


def test_pfrest_json_5_has_the_http_contract(pages):
    contract = words(sections(pages["pfrest.json.5"])["HTTP CONTRACT"])
    for fact in ("GET {target}?key={key}", "X-Request-Id", "other 4xx (misconfiguration)",
                 "tcp-lookup: 500: not found", "socketmap-lookup: NOTFOUND: not found",
                 "policy: permanent-error-action", "Several targets:", "dovecot-sasl", "Invalid credentials",
                 "the connection is closed"):
        assert fact in contract, fact


def test_no_page_sends_its_reader_to_the_readme(pages):
    """The pages are complete: no "see the README", no "see Monitoring" or "Several targets below" (the
    README's sections), no mid-sentence entry ("must be" at the end of an entry)."""
    for name, page in pages.items():
        text = words(page)
        assert not re.search(r"README|\bsee \*|\b(?:below|above)\)", text if name == "pfrest.json.5" else ""), name
        for pointer in ("see Monitoring", "Several targets below", "see Shared cache", "see pfrest serve below",
                        "see The HTTP contract", "Install above"):
            assert pointer not in text, (name, pointer)
    json_5 = sections(pages["pfrest.json.5"])
    for heading in ("TOP-LEVEL KEYS", "ENDPOINT KEYS"):
        for entry in re.split(r"\n(?=       \S)", json_5[heading]):
            assert not re.search(r"\b(?:must be|a|the|of|to)\s*$", entry.strip()), entry


def test_pfrest_8_says_where_query_takes_a_password_from(pages):
    """dovecot-sasl: the password comes from stdin or a prompt, never from the command line (ps shows argv)."""
    parts = re.split(r"(?m)^   (\S+)$", sections(pages["pfrest.8"])["COMMANDS"])
    text = words(dict(zip(parts[1::2], parts[2::2]))["query"])
    assert "password is read from stdin" in text and "never given on the command line" in text
