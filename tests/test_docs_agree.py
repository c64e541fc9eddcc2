"""What the README, docs/, master.cf.example and bin/test each say about the same things agrees: the cost of
a handler's start, how serve runs, what bin/test installs, and that the Debian package has done the
first steps master.cf.example lists."""

import re

from conftest import ROOT


def read(name):
    with open(f"{ROOT}/{name}") as f:
        return f.read()


def test_the_start_cost_and_threads_agree():
    deploying, master = read("docs/deploying.md"), read("master.cf.example")
    docs_start = re.search(r"each connection costs a Python start, about ([\d.]+) s", deploying).group(1)
    master_start = re.search(r"a Python start \(~([\d.]+) s\) per connection", master).group(1)
    assert docs_start == master_start
    assert "no threads on the request path" in read("docs/design.md")
    assert "one process, threads" not in master and "one event loop, no threads" in master


def test_the_readme_lists_what_bin_test_installs():
    packages = re.search(r'^PACKAGES="([^"]+)"', read("bin/test"), re.M).group(1).split()
    said = re.search(r"Set up and run the tests \(as root it also installs (.*?) from Debian", read("README.md"),
                     re.S).group(1)
    assert [p for p in packages if p not in said] == []


def test_master_cf_example_knows_what_the_package_did():
    master = read("master.cf.example")
    assert "The Debian package installed it" in master and "The Debian package created it" in master


def test_the_documented_example_is_pfrest_json_example():
    import json
    shown = re.search(r"```json\n(.*?)```", read("docs/configuration.md"), re.S).group(1)
    assert json.loads(shown) == json.loads(read("pfrest.json.example"))


def test_every_link_of_the_readme_and_docs_leads_to_a_file():
    import glob
    import os
    for name in ["README.md", "contrib/backends/README.md", *(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#]+)(?:#([^)]*))?\)", read(name)):
            if "://" not in target:
                path = os.path.join(ROOT, os.path.dirname(name), target)
                assert os.path.exists(path), (name, target)
                if anchor:   # GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens
                    headings = re.findall(r"(?m)^#+ (.*)$", read(os.path.relpath(path, ROOT)))
                    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                    assert anchor in slugs, (name, target, anchor)
